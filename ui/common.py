"""What the tabs share: error translation, per-session interrupts, saving outputs, running a job,
and the generation controls (prompt, sampler, steps, CFG, seed, size, batch count).

Only this module turns engine errors into ``gr.Error`` (rule 8: translated once, at the boundary).
"""
from __future__ import annotations

import base64
import binascii
import html
import logging
import math
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Optional

import gradio as gr
from PIL import Image

from engine import (Cancelled, Engine, EngineError, GenerateRequest, GenerateResult, InvalidRequest,
                    Job, ModelInfo, OutputStore, Progress, RateLimiter, Size, client_key)
from engine.infotext import parse_infotext
from engine.samplers import sampler_names

log = logging.getLogger("ui")

DEVICE_QUEUE = "device"  # concurrency_id of model loads: one at a time
# Generations wait in the engine's queue, not Gradio's: Gradio hands up to this many at once to the
# engine (each holds a handler thread while it waits) and queues the rest itself.
GENERATE_QUEUE = "generate"
GENERATE_ADMISSION = 32
MAX_BATCH = 16
MAX_SEED = 2**32 - 1
PROGRESS_INTERVAL_S = 0.1  # how often a waiting handler looks at its job
# How often a running handler sends the browser its progress line (and a new preview): every update
# is a message through Gradio's queue for each waiting client; 4 a second reads as live.
LIVE_INTERVAL_S = 0.25


# --- errors --------------------------------------------------------------------------------------

def user_error(exc: EngineError) -> gr.Error:
    """An engine error as the modal the user sees (its message is written for users already)."""
    return gr.Error(html.escape(str(exc), quote=False), title=_error_title(exc), print_exception=False)


def _error_title(exc: EngineError) -> str:
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", type(exc).__name__).lower()
    return words[0].upper() + words[1:]


def internal_error(what: str) -> gr.Error:
    """Log the exception being handled (once, with its traceback) and return a generic error."""
    log.exception("%s failed", what)
    return gr.Error(f"{what} failed with an internal error; the details are in the server log.",
                    print_exception=False)


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Engine errors become their own message; anything else is logged once and shown generically."""
    try:
        yield
    except gr.Error:
        raise
    except EngineError as exc:
        log.info("%s refused: %s", what, exc)
        raise user_error(exc) from None
    except Exception:
        raise internal_error(what) from None


# --- controls that name themselves in their errors -----------------------------------------------

def labelled(component: Any, preprocess: Callable[[Any], Any], payload: Any) -> Any:
    """Run Gradio's own check of an input with the control's label in its message: Gradio says
    "Value 0 is less than minimum value 1." without naming the control, and a value of the wrong
    type (any API caller can send one) ends in its generic "Could not preprocess input component"."""
    try:
        return preprocess(payload)
    except gr.Error as exc:
        raise gr.Error(html.escape(f"{component.label}: {exc.message}", quote=False), print_exception=False) from None
    except (TypeError, ValueError):
        raise gr.Error(html.escape(f"{component.label} must be a number, got {payload!r}", quote=False),
                       print_exception=False) from None


class Slider(gr.Slider):
    """``gr.Slider`` (the same widget: a template component) whose refusals name it."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return labelled(self, super().preprocess, payload)


class Number(gr.Number):
    """``gr.Number`` whose refusals name it; with ``precision=0`` a fraction is refused, not rounded."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        if self.precision == 0 and isinstance(payload, float) and math.isfinite(payload) and not payload.is_integer():
            raise gr.Error(f"{self.label} must be a whole number, got {payload!r}", print_exception=False)
        return labelled(self, super().preprocess, payload)


class Radio(gr.Radio):
    """``gr.Radio`` whose refusal of a value that is not a choice names it."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return labelled(self, super().preprocess, payload)


# --- per-session interrupts ----------------------------------------------------------------------

class Interrupts:
    """The cancel flags of the jobs each browser session (gradio's session hash) is running.

    ``Interrupt`` only ever sets the flags of the session that pressed it, so it cannot stop another
    user's job. A flag lives only while its job runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[str, set[threading.Event]] = {}

    def begin(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session, set()).add(flag)
        return flag

    def end(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            flags = self._flags.get(session, set())
            flags.discard(flag)
            if not flags:
                self._flags.pop(session, None)

    def interrupt(self, session: str) -> bool:
        """Flag this session's running jobs; False when it runs none."""
        with self._lock:
            flags = list(self._flags.get(session, ()))
        for flag in flags:
            flag.set()
        return bool(flags)


def session_of(request: Optional[gr.Request]) -> str:
    return (request.session_hash if request is not None else None) or "anonymous"


def upload_bytes(payload: Any) -> bytes:
    """The uploaded file's bytes (a ``data:`` URL from the clipboard, else the file Gradio stored)."""
    url = getattr(payload, "url", None) or ""
    try:
        if url.startswith("data:"):
            return base64.b64decode(url.split(",", 1)[-1], validate=True)
        return Path(payload.path).read_bytes()
    except (binascii.Error, ValueError, TypeError):
        raise InvalidRequest("the pasted image is not valid base64 data") from None
    except OSError as exc:
        raise InvalidRequest(f"the uploaded file could not be read ({exc.strerror}); upload it again") from None


def client_of(request: Optional[gr.Request]) -> str:
    """Who a request counts against for ``--rate-limit``: the user, else the browser's address."""
    client = getattr(request, "client", None)
    return client_key(getattr(request, "username", None), getattr(client, "host", None))


def owner_of(request: Optional[gr.Request]) -> str:
    """Who a job belongs to in the engine's queue: the logged-in user (the same name the HTTP API
    uses, so a user's API ``/interrupt`` reaches their browser jobs too), else the browser session."""
    username = getattr(request, "username", None) if request is not None else None
    return f"user:{username}" if username else f"session:{session_of(request)}"


# --- running a job -------------------------------------------------------------------------------

@dataclass
class JobOutcome:
    """What a generate handler shows: the saved PNGs, the first image's parameters and a stats line."""

    paths: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    stats: str = ""


@dataclass(frozen=True)
class AppContext:
    """What every tab's handlers need, built once by ``build_app``."""

    engine: Engine
    outputs: OutputStore
    interrupts: Interrupts
    concurrency: int
    limiter: Optional[RateLimiter] = None  # --rate-limit, shared with the HTTP API

    @property
    def fixed_shape(self) -> bool:
        return self.engine.backend.fixed_shape

    def model_info(self, model_id: Optional[str]) -> Optional[ModelInfo]:
        models = self.engine.models()
        return next((m for m in models if m.id == model_id), None)


def parse_size(text: Any) -> Optional[Size]:
    if text in (None, ""):
        return None
    try:
        return Size.parse(str(text))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def request_size(ctx: AppContext, resolution: Any, width: Any, height: Any) -> Optional[Size]:
    """Fixed-shape backends take the resolution dropdown, the eager backend the sliders."""
    if ctx.fixed_shape:
        return parse_size(resolution)
    if width in (None, "") or height in (None, ""):
        return parse_size(resolution)
    return Size(int(width), int(height))


def whole(name: str, value: Any, default: Optional[int] = None) -> Optional[int]:
    """Sliders and numbers arrive as floats (or None from an API caller that leaves them out)."""
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise InvalidRequest(f"{name} must be a whole number, got {value!r}")
    return int(number)


def check_batch(count: Any) -> int:
    number = whole("batch count", count, 1)
    if not 1 <= number <= MAX_BATCH:
        raise InvalidRequest(f"batch count must be from 1 to {MAX_BATCH}, got {number}")
    return number


def pick_seed(seed: int) -> int:
    """-1 draws a random seed; image ``i`` of a batch uses ``seed + i`` either way."""
    return random.SystemRandom().randrange(MAX_SEED - MAX_BATCH) if seed == -1 else seed


@dataclass(frozen=True)
class LiveUpdate:
    """What a running generate handler shows: the progress line, and a new live preview (or None)."""

    line: str
    preview: Optional[Image.Image] = None


class ProgressReporter:
    """Engine ``Progress`` → a progress line (and gradio's progress bar), across the images of a
    batch, throttled: each call returns the line when it is due, else None."""

    def __init__(self, progress: Optional[gr.Progress], count: int):
        self.progress, self.count = progress, count
        self.index = 0
        self._last = 0.0

    def queued(self, position: int) -> Optional[str]:
        """Waiting in the engine's queue (position 1: next when a running job finishes)."""
        if not self._due(final=False):
            return None
        line = f"{self._prefix()}In queue: position {position}"
        if self.progress is not None:
            self.progress(0.0, desc=line)
        return line

    def _prefix(self) -> str:
        return f"Image {self.index + 1}/{self.count} · " if self.count > 1 else ""

    def _due(self, final: bool) -> bool:
        now = time.monotonic()
        if now - self._last < LIVE_INTERVAL_S and not final:
            return False
        self._last = now
        return True

    def __call__(self, p: Progress) -> Optional[str]:
        if not self._due(final=p.step >= p.total_steps):
            return None
        done = self.index * p.total_steps + p.step
        line = f"{self._prefix()}step {p.step}/{p.total_steps} · {p.it_per_s:.2f} it/s"
        if self.progress is not None:
            self.progress((done, self.count * p.total_steps), desc=line, unit="steps")
        return line


def wait_for(job: Job, reporter: ProgressReporter) -> Generator[LiveUpdate, None, GenerateResult]:
    """Wait for a job in the engine's queue, yielding its queue position, then its steps and each new
    live preview; returns its result."""
    shown = None
    while not job.wait(PROGRESS_INTERVAL_S):
        if job.state == "queued":
            line = reporter.queued(job.position)
        else:
            line = reporter(job.progress) if job.progress is not None else None
        preview = job.progress.preview if job.progress is not None else None
        if line is not None:
            yield LiveUpdate(line, preview if preview is not shown else None)
            shown = preview
    return job.result()


def tab_outputs(run: Generator[LiveUpdate, None, JobOutcome]) -> Iterator[tuple[Any, ...]]:
    """A generate handler's outputs (gallery, parameters, stats): while ``run`` runs, its progress
    line in the stats and each live preview in the gallery; then the saved images, the first one's
    parameters and the stats line."""
    while True:
        try:
            update = next(run)
        except StopIteration as finished:
            outcome: JobOutcome = finished.value
            break
        yield ([update.preview] if update.preview is not None else gr.skip()), gr.skip(), update.line
    yield outcome.paths, (outcome.infotexts[0] if outcome.infotexts else ""), outcome.stats


def run_job(ctx: AppContext, make_request: Callable[[], GenerateRequest], batch_count: Any,
            user: Optional[gr.Request], progress: Optional[gr.Progress],
            what: str) -> Generator[LiveUpdate, None, JobOutcome]:
    """Generate ``batch_count`` images, each a job in the engine's queue, translating engine errors
    into ``gr.Error``. Jobs are submitted a model's largest batch at a time: they can run as one
    device call, yet other users' jobs still take turns with a long batch count. Each image is saved
    as soon as it exists; an interrupt keeps the finished ones. Yields live previews while it runs
    (see ``tab_outputs``) and returns the outcome.

    ``make_request`` builds the request inside the translation, so a malformed size or seed is
    reported like any other engine error.
    """
    session, owner = session_of(user), owner_of(user)
    flag = ctx.interrupts.begin(session)
    reporter = ProgressReporter(progress, count=1)
    outcome = JobOutcome()
    results: list[GenerateResult] = []
    started = time.perf_counter()
    count = 0
    jobs: list[Job] = []
    try:
        with translate_errors(what):
            request = make_request()
            if ctx.limiter is not None:
                ctx.limiter.acquire(client_of(user))
            count = reporter.count = check_batch(batch_count)
            seed = pick_seed(request.seed)
            chunk = ctx.engine.batch_limit(request.model)  # cheap: no artifact checks on the hot path
            for index in range(count):
                if flag.is_set():
                    break
                if index % chunk == 0:
                    jobs += [ctx.engine.submit(replace(request, seed=seed + i, num_images=1), owner=owner, cancel=flag)
                             for i in range(index, min(count, index + chunk))]
                reporter.index = index
                try:
                    result = yield from wait_for(jobs[index], reporter)
                except Cancelled:
                    break
                results.append(result)
                for image in result.images:
                    outcome.paths.append(str(ctx.outputs.save(request.mode, image)))
                    outcome.infotexts.append(image.infotext)
    finally:
        for job in jobs:  # a failure or an interrupt: the rest of the batch must not run
            job.interrupt()
        ctx.interrupts.end(session, flag)
    outcome.stats = stats_line(results, count, flag.is_set(), time.perf_counter() - started)
    for notice in dict.fromkeys(n for r in results for n in r.notices):
        gr.Warning(notice[0].upper() + notice[1:])
        outcome.stats += f"\n\n⚠️ {html.escape(notice, quote=False)}"
    return outcome


def stats_line(results: list[GenerateResult], wanted: int, interrupted: bool, wall_s: float) -> str:
    """``Seed 42–43 · 20 steps · 2.31 s · 8.66 it/s · model 512x512 · sampler`` (markdown), prefixed
    with how far an interrupted batch got."""
    if not results:
        return "**Interrupted** before the first image was done." if interrupted else ""
    first = results[0]
    steps = sum(r.timings.get("steps_run", 0.0) for r in results)
    denoise = sum(r.timings.get("denoise_s", 0.0) for r in results)
    load = sum(r.timings.get("load_s", 0.0) for r in results)
    seeds = f"Seed {first.seed}" + (f"–{results[-1].seed}" if len(results) > 1 else "")
    parts = [seeds, f"{first.steps} steps", f"{wall_s:.2f} s", f"{steps / denoise if denoise else 0:.2f} it/s",
             f"{first.model} {first.size}", first.sampler]
    if load >= 0.05:
        parts.append(f"load {load:.1f} s")
    batched = max(r.batch_requests for r in results)
    if batched > 1:
        parts.append(f"batched with up to {batched - 1} other request{'s' if batched > 2 else ''}")
    line = " · ".join(parts)
    if interrupted:
        line = f"**Interrupted** after {len(results)} of {wanted} images · " + line
    return line


def seed_from_infotext(info: str, current: Any) -> Any:
    """The ♻️ button: the seed of the last (or selected) image, else the current value."""
    seed = parse_infotext(info or "").get("Seed")
    try:
        return int(seed) if seed is not None else current
    except ValueError:
        return current


# --- generation controls -------------------------------------------------------------------------

@dataclass
class GenerationControls:
    """The controls both generation tabs have (img2img adds its own in ``Img2ImgControls``)."""

    tab: str
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    generate: gr.Button
    interrupt: gr.Button
    resolution: gr.Dropdown
    width: gr.Slider
    height: gr.Slider
    sampler: gr.Dropdown
    steps: gr.Slider
    cfg_scale: gr.Slider
    seed: gr.Number
    random_seed: gr.Button
    reuse_seed: gr.Button
    batch_count: gr.Slider
    gallery: gr.Gallery
    stats: gr.Markdown
    info: gr.Textbox


def resolution_choices(info: Optional[ModelInfo], fixed_shape: bool) -> list[str]:
    if info is None:
        return []
    sizes = info.compiled_sizes() if fixed_shape else list(info.resolutions)
    return [str(s) for s in sizes]


def prompt_row(tab: str) -> tuple[gr.Textbox, gr.Textbox, gr.Button, gr.Button]:
    """Prompts on the left, Generate / Interrupt on the right, as A1111 lays them out."""
    with gr.Row(elem_id=f"{tab}_toprow", equal_height=False):
        with gr.Column(scale=6, min_width=300):
            prompt = gr.Textbox(label="Prompt", show_label=False, lines=3, max_lines=8, elem_id=f"{tab}_prompt",
                                placeholder="Prompt (press Ctrl+Enter to generate)")
            negative = gr.Textbox(label="Negative prompt", show_label=False, lines=2, max_lines=6,
                                  elem_id=f"{tab}_neg_prompt", placeholder="Negative prompt")
        with gr.Column(scale=1, min_width=160, elem_id=f"{tab}_actions"):
            interrupt = gr.Button("Interrupt", elem_id=f"{tab}_interrupt", variant="secondary", size="sm")
            generate = gr.Button("Generate", elem_id=f"{tab}_generate", variant="primary", size="lg",
                                 elem_classes=["generate-button"])
    return prompt, negative, generate, interrupt


def parameter_controls(ctx: AppContext, tab: str, info: Optional[ModelInfo]) -> dict[str, Any]:
    """Sampler, steps, size, batch count, CFG and seed, with the model's registry defaults."""
    defaults = info.defaults if info is not None else None
    sizes = resolution_choices(info, ctx.fixed_shape)
    first = Size.parse(sizes[0]) if sizes else Size(512, 512)
    with gr.Row():
        sampler = gr.Dropdown(sampler_names(), value=defaults.sampler if defaults else "Euler a",
                              label="Sampling method", elem_id=f"{tab}_sampling", allow_custom_value=True, scale=2)
        steps = Slider(1, 150, step=1, value=defaults.steps if defaults else 20, label="Sampling steps",
                          elem_id=f"{tab}_steps", scale=3)
    with gr.Row():
        resolution = gr.Dropdown(sizes, value=sizes[0] if sizes else None, label="Resolution (compiled sizes)",
                                 elem_id=f"{tab}_resolution", allow_custom_value=True, visible=ctx.fixed_shape,
                                 info=None if sizes else "nothing compiled for this model yet: see the Models tab")
        width = Slider(64, 2048, step=8, value=first.width, label="Width", elem_id=f"{tab}_width",
                          visible=not ctx.fixed_shape)
        height = Slider(64, 2048, step=8, value=first.height, label="Height", elem_id=f"{tab}_height",
                           visible=not ctx.fixed_shape)
        batch_count = Slider(1, MAX_BATCH, step=1, value=1, label="Batch count", elem_id=f"{tab}_batch_count")
    cfg_scale = Slider(0, 30, step=0.5, value=defaults.cfg_scale if defaults else 7.0, label="CFG Scale",
                          elem_id=f"{tab}_cfg_scale")
    with gr.Row(equal_height=True, elem_id=f"{tab}_seed_row"):
        seed = Number(-1, label="Seed", precision=0, elem_id=f"{tab}_seed", scale=6, minimum=-1, maximum=MAX_SEED)
        random_seed = gr.Button("🎲", elem_id=f"{tab}_random_seed", elem_classes=["tool"], scale=0, min_width=48)
        reuse_seed = gr.Button("♻️", elem_id=f"{tab}_reuse_seed", elem_classes=["tool"], scale=0, min_width=48)
    return dict(sampler=sampler, steps=steps, resolution=resolution, width=width, height=height,
                batch_count=batch_count, cfg_scale=cfg_scale, seed=seed, random_seed=random_seed,
                reuse_seed=reuse_seed)


def output_panel(tab: str) -> tuple[gr.Gallery, gr.Markdown, gr.Textbox]:
    gallery = gr.Gallery(label="Images", show_label=False, elem_id=f"{tab}_gallery", columns=2, height=512,
                         object_fit="contain", format="png", interactive=False, preview=True,
                         buttons=["download", "fullscreen"])
    stats = gr.Markdown(label="Stats", elem_id=f"{tab}_stats", elem_classes=["stats"])
    info = gr.Textbox(label="Generation info", elem_id=f"{tab}_info", lines=3, max_lines=8, interactive=False,
                      buttons=["copy"])
    return gallery, stats, info


def wire_common(ctx: AppContext, controls: GenerationControls) -> None:
    """Seed buttons, Interrupt and picking an image in the gallery (shared by both tabs)."""
    controls.random_seed.click(lambda: -1, outputs=controls.seed, api_visibility="private", queue=False)
    controls.reuse_seed.click(seed_from_infotext, inputs=[controls.info, controls.seed], outputs=controls.seed,
                              api_visibility="private", queue=False)

    def interrupt(request: gr.Request) -> None:
        """Stop this session's running generation at the next step boundary."""
        if ctx.interrupts.interrupt(session_of(request)):
            gr.Info("Interrupting at the next step…")

    # Not in the device queue: an interrupt must never wait behind the job it stops.
    controls.interrupt.click(interrupt, api_name=f"{controls.tab}_interrupt", concurrency_limit=None,
                             api_visibility="undocumented")
    controls.gallery.select(_selected_infotext, outputs=controls.info, api_visibility="private", queue=False)


def _selected_infotext(evt: gr.SelectData) -> Any:
    """Show the parameters of the image picked in the gallery (read back from its PNG)."""
    from PIL import Image

    value = evt.value if isinstance(evt.value, dict) else {}
    image = value.get("image") if isinstance(value.get("image"), dict) else value
    path = image.get("path") if isinstance(image, dict) else None
    if not path:
        return gr.skip()
    try:
        with Image.open(path) as png:
            from engine.infotext import read_parameters

            return read_parameters(png) or gr.skip()
    except OSError:
        return gr.skip()


def model_defaults_updates(ctx: AppContext, controls: GenerationControls, model_id: str) -> dict[Any, Any]:
    """A model's registry defaults for sampler, steps, CFG (and size on the eager backend's sliders)."""
    info = ctx.model_info(model_id)
    if info is None:
        return {}
    first = info.resolutions[0]
    return {
        controls.width: first.width,
        controls.height: first.height,
        controls.sampler: info.defaults.sampler,
        controls.steps: info.defaults.steps,
        controls.cfg_scale: info.defaults.cfg_scale,
    }
