"""The Models tab: every registry model × resolution, compiled or not, warm or not, load / unload."""
from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from engine import ModelInfo
from engine.artifacts import compile_command

from .common import DEVICE_QUEUE, AppContext, parse_size, translate_errors

TAB = "models"
COLUMNS = ["Model", "Title", "Family", "Resolution", "Batch sizes", "Prompt tokens", "Compiled", "Warm", "To compile",
           "LoRAs fused"]
_STATE_LABEL = {"compiled": "✅ compiled", "missing": "❌ missing", "stale": "⚠️ stale", "broken": "🛑 broken",
                "n/a": "— (eager)"}


def model_rows(ctx: AppContext, models: list[ModelInfo]) -> list[list[str]]:
    """One row per model × resolution, with the command that compiles what is not compiled."""
    backend = ctx.engine.backend.name
    registry = ctx.engine.registry.path
    rows = []
    for info in models:
        for size in info.resolutions:
            state = info.compiled.get(size, "missing")
            command = ""
            if state in ("missing", "stale", "broken"):
                command = compile_command(info.id, size, backend, registry) + (" --force" if state != "missing" else "")
            warm = "🔥 warm" if size in info.warm else ""
            batches = ", ".join(str(b) for b in info.batch_sizes) + (" (+ CFG ≤ 1)" if info.cfg_free_unet else "")
            tokens = ", ".join(str(75 * c) for c in info.prompt_chunks)
            rows.append([info.id, info.title, info.family, str(size), batches, tokens, _STATE_LABEL.get(state, state),
                         warm, command, " ".join(info.loras)])
    return rows


def process_rss_bytes(status_file: Path = Path("/proc/self/status")) -> Optional[int]:
    """Resident memory of this process (Linux), or None where /proc is not there."""
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def status_markdown(ctx: AppContext) -> str:
    """Backend, memory and what is warm (on neuron: which NeuronCores each warm pipeline holds)."""
    status = ctx.engine.status()
    rss = process_rss_bytes()
    memory = f"{rss / 2**30:.2f} GiB" if rss is not None else "n/a"
    replicas = Counter((warm["model"], warm["size"]) for warm in status["warm"])
    copies = f" ({len(status['warm'])} copies)" if len(status["warm"]) > len(replicas) else ""
    # --max-warm counts models at a size, not their replicas
    head = (f"**Backend** {status['backend']} on `{status['device']}` · **warm models** "
            f"{len(replicas)} of at most {status['max_warm']}{copies} · **process memory (RSS)** {memory}")
    if status["backend"] == "neuron":
        cores = sorted({core for warm in status["warm"] for core in warm.get("device_ids", [])})
        head += f" · **NeuronCores in use** {', '.join(map(str, cores)) or 'none'}"
    items = []
    for warm in status["warm"]:
        devices = f" on NeuronCores {', '.join(map(str, warm['device_ids']))}" if warm.get("device_ids") else ""
        busy = " (generating)" if warm["in_use"] else " (idle)"
        replica = f" replica {warm['replica'] + 1}" if replicas[(warm["model"], warm["size"])] > 1 else ""
        items.append(f"- 🔥 `{warm['model']}` @ {warm['size']}{replica}{devices}, loaded in "
                     f"{warm['load_seconds']:.1f} s{busy}")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(status.get("versions", {}).items()))
    parts = [head, "\n".join(items) if items else "Nothing is warm: the first generation loads its model."]
    if "ray" in status:
        parts.append(ray_markdown(status["ray"]))
    if versions:
        parts.append(f"<small>{html.escape(versions)}</small>")
    return "\n\n".join(parts)


def ray_markdown(ray: dict[str, Any]) -> str:
    """Under ``--ray``: each model's Serve deployment, its replicas by state, autoscaling bounds and
    the cold start a request waits for when the model is scaled to zero."""
    lines = [f"**Ray Serve** application `{ray['application']}`"]
    for model, d in ray["deployments"].items():
        scaling = d["scaling"]
        states = ", ".join(f"{count} {state.lower()}" for state, count in d["replicas"].items()) or "none"
        cold = f"{d['cold_start_s']:.0f} s" if d["cold_start_s"] is not None else "not measured yet"
        zero = (f" · scaled to zero: the next request starts a replica (cold start {cold})"
                if not d["running"] and scaling["min_replicas"] == 0 else f" · cold start {cold}")
        lines.append(f"- `{model}`: {d['status'].lower()}, replicas {states} (autoscaling "
                     f"{scaling['min_replicas']}–{scaling['max_replicas']}, {scaling['target_ongoing_requests']:g} "
                     f"requests each){zero}")
    return "\n".join(lines)


def build(ctx: AppContext) -> None:
    models = ctx.engine.models()
    ids = [(m.title if m.title == m.id else f"{m.title} ({m.id})", m.id) for m in models]
    first = models[0] if models else None
    with gr.Tab("Models", id=TAB, elem_id=f"tab_{TAB}") as tab:
        status = gr.Markdown(status_markdown(ctx), elem_id="models_status")
        table = gr.Dataframe(model_rows(ctx, models), headers=COLUMNS, interactive=False, wrap=True,
                             elem_id="models_table", column_widths=["12%", "14%", "7%", "9%", "7%", "10%", "7%", "34%"])
        with gr.Row(equal_height=True, elem_id="models_actions"):
            model = gr.Dropdown(ids, value=first.id if first else None, label="Model", elem_id="models_model",
                                scale=3)
            size = gr.Dropdown(_sizes(first), value=_sizes(first)[0] if first else None, label="Resolution",
                               elem_id="models_size", scale=2)
            load = gr.Button("Load (warm up)", variant="primary", elem_id="models_load", scale=1, min_width=130)
            unload = gr.Button("Unload", elem_id="models_unload", scale=1, min_width=100)
            refresh = gr.Button("🔄 Refresh", elem_id="models_refresh", scale=1, min_width=100)
        message = gr.Markdown(elem_id="models_message")

    def refresh_view() -> tuple[Any, Any]:
        return model_rows(ctx, ctx.engine.models()), status_markdown(ctx)

    def sizes_for(model_id: str) -> Any:
        info = ctx.model_info(model_id)
        sizes = _sizes(info)
        return gr.update(choices=sizes, value=sizes[0] if sizes else None)

    def load_model(model_id: str, size_text: Optional[str]) -> tuple[Any, Any, str]:
        """Warm ``model_id`` at ``size_text`` so the next generation starts at once."""
        with translate_errors("loading a model"):
            warm = ctx.engine.load(model_id, parse_size(size_text))
        rows, markdown = refresh_view()
        return rows, markdown, f"Loaded **{warm.key}** in {warm.load_seconds:.1f} s."

    def unload_model(model_id: str, size_text: Optional[str]) -> tuple[Any, Any, str]:
        """Drop the warm pipelines of ``model_id`` at ``size_text`` that are not generating."""
        with translate_errors("unloading a model"):
            count = ctx.engine.unload(model_id, parse_size(size_text))
        rows, markdown = refresh_view()
        return rows, markdown, (f"Unloaded {count} pipeline(s) of **{model_id}**." if count
                                else f"Nothing of **{model_id}** @ {size_text} was warm (or it is generating).")

    model.change(sizes_for, inputs=model, outputs=size, api_visibility="private", queue=False)
    # Loading uses the accelerator: it waits its turn in the device queue like a generation.
    load.click(load_model, inputs=[model, size], outputs=[table, status, message], api_name="load_model",
               concurrency_id=DEVICE_QUEUE, concurrency_limit=ctx.concurrency)
    unload.click(unload_model, inputs=[model, size], outputs=[table, status, message], api_name="unload_model",
                 concurrency_limit=None)
    refresh.click(refresh_view, outputs=[table, status], api_visibility="private", concurrency_limit=None)
    tab.select(refresh_view, outputs=[table, status], api_visibility="private", concurrency_limit=None)


def _sizes(info: Optional[ModelInfo]) -> list[str]:
    return [str(s) for s in info.resolutions] if info is not None else []


