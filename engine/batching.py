"""Running a batch of queued generation jobs: their images as rows of shared pipeline calls.

The scheduler groups jobs that share model, size, mode, sampler, steps, CFG scale and (img2img)
strength. ``BatchRun`` lays their images out as rows — job after job, image after image — and runs
them in calls of at most ``rows_per_call`` rows (the model's largest compiled batch), each row with
its own prompt, negative prompt, init image and ``torch.Generator`` seeded ``seed + i``, so a row
comes out as the image the request makes alone (diffusers draws the initial noise and the
ancestral samplers' noise per generator). The compiled UNet pads a short call to a compiled batch
and trims the result: padding never reaches an image.

Per job: its own progress (reported at every step of every call it is in), its own interrupt (the
job leaves at the next step with the images it finished; the others go on) and skip (its rows in
the current call are dropped).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .errors import Cancelled
from .infotext import png_with_parameters
from .inpaint import overlay, whole_image_kwargs
from .pipelines import WarmPipeline
from .preview import latent_preview
from .prompt_embeds import CHUNKED_FAMILIES, with_prompt_embeds
from .prompts import truncation_notices
from .samplers import seed_scheduler
from .scheduler import Job
from .types import GeneratedImage, GenerateRequest, GenerateResult, Progress, Size


@dataclass(frozen=True)
class Row:
    """One image of one job: where it sits in its request and the seed it is made with."""

    job: Job
    index: int
    seed: int


class _AllLeft(Exception):
    """Every job of the running call was interrupted or skipped: stop the call."""


class Clock:
    """Splits the time of the calls into denoising (up to the last step) and decoding."""

    def __init__(self) -> None:
        self.denoise_s = 0.0
        self.decode_s = 0.0
        self.steps = 0
        self._start = 0.0
        self._last_step = 0.0

    def start(self) -> None:
        self._start = self._last_step = time.perf_counter()

    def step(self) -> None:
        self._last_step = time.perf_counter()
        self.steps += 1

    def finish(self) -> None:
        self.denoise_s += self._last_step - self._start
        self.decode_s += time.perf_counter() - self._last_step


class BatchRun:
    """The images of ``jobs`` (all compatible, see the module docstring) made on ``warm``.

    ``describe(request, resolved, seed)`` is the infotext of one image; ``kwargs(rows)`` the
    pipeline arguments of one call (prompts, generators, init images for those rows).
    A pass that feeds another (hires fix's first pass) has no ``describe``: each row's raw pipeline
    output is kept in ``outputs`` instead of becoming an image. ``mode``, ``size`` and ``rows``
    override what the jobs' requests say (a second pass runs img2img at another size, on the rows
    the first pass finished).
    """

    def __init__(self, jobs: list[Job], warm: WarmPipeline, rows_per_call: int,
                 describe: Optional[Callable[[Any, int], str]], kwargs: Callable[[list[Row]], dict[str, Any]],
                 preview_every: int = 0, *, mode: Optional[str] = None, size: Optional[Size] = None,
                 rows: Optional[list[Row]] = None):
        self.jobs, self.warm, self.rows_per_call = jobs, warm, max(1, rows_per_call)
        self.describe, self.kwargs, self.preview_every = describe, kwargs, preview_every
        self.mode = mode or jobs[0].payload.request.mode
        self.size = size or jobs[0].payload.resolved.size
        self.previews: dict[Job, Any] = {}  # job -> its latest live preview (PIL image)
        self.rows = rows if rows is not None else [Row(job, i, job.payload.resolved.seed + i) for job in jobs
                                                    for i in range(job.payload.request.num_images)]
        self.outputs: dict[Row, Any] = {}  # without ``describe``: row -> its pipeline output
        self.images: dict[Job, list[GeneratedImage]] = {job: [] for job in jobs}
        self.left: dict[Job, str] = {}  # job -> why it left the batch ("interrupted")
        self.clock = Clock()
        self.load_s = 0.0  # how long its caller waited for the warm pipeline

    @property
    def work(self) -> Any:
        return self.jobs[0].payload

    def run(self) -> None:
        for start in range(0, len(self.rows), self.rows_per_call):
            rows = [row for row in self.rows[start:start + self.rows_per_call] if row.job not in self.left]
            if rows:
                self._call(rows)

    def _call(self, rows: list[Row]) -> None:
        resolved = self.work.resolved
        mode, kwargs = self.mode, self.kwargs(rows)
        if mode != "inpaint" and self.warm.inpainting:  # an inpainting UNet runs everything as inpaint
            mode, kwargs = "inpaint", whole_image_kwargs(kwargs, self.size)
        pipe = self.warm.view(mode, resolved.sampler)
        kwargs = with_prompt_embeds(self.warm.components, self.warm.spec.family, kwargs, resolved.prompt_chunks,
                                    bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
        seed_scheduler(pipe.scheduler, [row.seed for row in rows])
        callback = _BatchCallback(self, rows)
        self.clock.start()
        try:
            output = pipe(**kwargs, callback_on_step_end=callback)
        except _AllLeft:
            return
        finally:
            self.clock.finish()
        for row, image in zip(rows, output.images):
            if row.job in self.left or row.job in callback.skipped:
                continue
            if self.describe is None:
                self.outputs[row] = image
                continue
            inpainted = row.job.payload.resolved.inpaint
            if inpainted is not None and self.mode == "inpaint":  # the original back outside the mask
                image = overlay(image, inpainted)
            infotext = self.describe(row.job.payload, row.seed)
            self.images[row.job].append(GeneratedImage(image, row.seed, infotext, png_with_parameters(image, infotext)))

    def leave(self, job: Job, why: str) -> None:
        """``job`` stops here: its caller gets ``Cancelled`` with its finished images at once."""
        self.left[job] = why
        if not job.future.done():
            job.future.set_exception(Cancelled(why, images=tuple(self.images[job])))

    def outcome(self, job: Job, timings: dict[str, float]) -> Any:
        """The job's ``GenerateResult`` (or the ``Cancelled`` it left with)."""
        if job in self.left:
            return Cancelled(self.left[job], images=tuple(self.images[job]))
        request: GenerateRequest = job.payload.request
        resolved = job.payload.resolved
        notices = self._notices(request, resolved)
        return GenerateResult(request, resolved.spec.id, self.size, resolved.sampler, resolved.steps,
                              resolved.cfg_scale, resolved.seed, tuple(self.images[job]),
                              {**timings, "batch_requests": float(len(self.jobs))}, notices)


    def _notices(self, request: GenerateRequest, resolved: Any) -> tuple[str, ...]:
        """The words of a too-long prompt that were ignored, and what to do about it."""
        if self.warm.spec.family in CHUNKED_FAMILIES:  # counted when the request was resolved
            return resolved.notices
        return truncation_notices(self.warm.components["tokenizer"], request.prompt, request.negative_prompt,
                                  self.warm.family.text_length)


class _BatchCallback:
    """``callback_on_step_end`` of one call: progress for each job in it; interrupt and skip."""

    def __init__(self, run: BatchRun, rows: list[Row]):
        self.run, self.rows = run, rows
        self.jobs = list(dict.fromkeys(row.job for row in rows))
        self.first_index = {job: next(r.index for r in rows if r.job is job) for job in self.jobs}
        self.count = {job: sum(1 for r in rows if r.job is job) for job in self.jobs}
        self.skipped: set[Job] = set()
        self.started = time.perf_counter()

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.run.clock.step()
        elapsed = time.perf_counter() - self.started
        every = self.run.preview_every
        if every and (step + 1) % every == 0 and step + 1 < pipe.num_timesteps and "latents" in callback_kwargs:
            self._preview(callback_kwargs["latents"])
        for job in self.jobs:
            if job in self.run.left or job in self.skipped:
                continue
            progress = Progress(step + 1, pipe.num_timesteps, self.first_index[job], job.payload.request.num_images,
                                elapsed, (step + 1) / elapsed if elapsed > 0 else 0.0, self.run.previews.get(job),
                                batch=len(self.jobs), images_in_call=self.count[job])
            job.report(progress)
            if job.payload.on_progress is not None:
                job.payload.on_progress(progress)
            if job.interrupted:
                self.run.leave(job, "interrupted")
            elif job.take_skip():
                self.skipped.add(job)
        if all(job in self.run.left or job in self.skipped for job in self.jobs):
            raise _AllLeft()
        return callback_kwargs

    def _preview(self, latents: Any) -> None:
        """Each job's first image in this call, as the cheap latent -> RGB approximation."""
        size = self.run.size
        for job in self.jobs:
            row = next(i for i, r in enumerate(self.rows) if r.job is job)
            self.run.previews[job] = latent_preview(latents[row], self.run.warm.spec.family, (size.width, size.height))


def generators(rows: list[Row]) -> Any:
    """One CPU generator per row (a single one, not a list, for one row: the solo path as before)."""
    made = [torch.Generator("cpu").manual_seed(row.seed) for row in rows]
    return made[0] if len(made) == 1 else made


def per_row(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


__all__ = ["BatchRun", "Row", "Clock", "generators", "per_row"]
