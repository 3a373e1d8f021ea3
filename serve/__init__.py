"""Ray Serve: the same app on a Ray cluster (``python app.py --ray``; docs/scaling.md).

- ``deployments``: ``ModelServer``, one Serve deployment per registry model, each replica owning an
  ``Engine`` with that model warm; and ``Ingress``, which serves the same UI and HTTP API with a
  ``ClusterEngine`` whose device workers call the model deployments through Serve handles.
- ``cluster_engine``: ``ClusterEngine``, the engine facade the faces use under Ray.
- ``config``: deployment options per model (autoscaling from the registry's ``scaling``, or a fixed
  ``--replicas`` count; ``neuron_cores`` / ``num_cpus`` per replica) and the ``serve deploy`` config.
- ``app``: the application builder ``serve run`` / ``serve deploy`` import.

Ray is optional (requirements-ray.txt): nothing outside this package imports it, and ``app.py``
imports this package only with ``--ray``.
"""
