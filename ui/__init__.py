"""The Gradio web UI: ``build_app(engine, settings)`` → ``gr.Blocks`` with the txt2img, img2img,
PNG Info and Models tabs, all generation going through Gradio's one queue.

Gradio is imported inside the functions so that ``ui.settings`` (and ``python app.py --help``)
stay fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gradio as gr

    from engine import Engine, OutputStore, RateLimiter

    from .settings import AppSettings

TITLE = "Stable Diffusion"
CACHE_CLEANUP = (3600, 86400)  # Gradio's delete_cache: (every N seconds, files older than M seconds)

CSS = """
.gradio-container { max-width: 1500px !important; }
#header_row { align-items: end; }
#header_title h1 { margin: 0; font-size: 1.35rem; }
#header_backend { text-align: right; opacity: 0.8; font-size: 0.9rem; }
.generate-button { min-height: 5.2em !important; font-size: 1.2rem !important; font-weight: 600 !important; }
[id$="_actions"] { gap: 6px !important; }
[id$="_seed_row"] .tool { max-width: 2.8em; min-width: 2.8em !important; font-size: 1.2rem; align-self: center;
                          height: 2.4em; padding: 0 !important; }
#models_actions button { max-height: 3em; align-self: center; }
.stats p { margin: 0.2em 0.4em; font-family: ui-monospace, monospace; font-size: 0.85rem; opacity: 0.85; }
.pnginfo-table { width: 100%; border-collapse: collapse; font-size: 0.9rem; }
.pnginfo-table th, .pnginfo-table td { border: none !important; border-bottom: 1px solid var(--border-color-primary) !important;
                                       padding: 0.35em 0.6em !important; text-align: left; vertical-align: top; }
.pnginfo-table th { width: 11em; white-space: nowrap; opacity: 0.75; font-weight: 600; }
.pnginfo-table td { word-break: break-word; }
#models_table td { font-size: 0.85rem; }
footer { display: none !important; }
"""

# Ctrl+Enter in a prompt box clicks that tab's Generate, as in A1111.
HEAD = """
<script>
document.addEventListener('keydown', (e) => {
  if (!(e.key === 'Enter' && (e.ctrlKey || e.metaKey))) return;
  const box = e.target.closest && e.target.closest('[id$="_prompt"], [id$="_neg_prompt"]');
  if (!box) return;
  const tab = box.id.replace(/_(neg_)?prompt$/, '');
  const button = document.getElementById(tab + '_generate');
  if (button) { e.preventDefault(); button.click(); }
});
</script>
"""


def launch_styles() -> dict[str, Any]:
    """Theme, CSS and head for ``Blocks.launch`` (Gradio 6 takes them there, not in ``Blocks``)."""
    import gradio as gr

    theme = gr.themes.Default(primary_hue="orange", secondary_hue="slate", neutral_hue="slate",
                              radius_size="sm", spacing_size="sm", text_size="md")
    return {"theme": theme, "css": CSS, "head": HEAD}


def build_app(engine: "Engine", settings: "AppSettings", outputs: Optional["OutputStore"] = None,
              limiter: Optional["RateLimiter"] = None) -> "gr.Blocks":
    """The whole web app for ``engine``; call ``.queue()`` is done here, ``launch`` is the caller's.
    ``outputs`` and ``limiter`` are shared with the HTTP API when the caller has them."""
    import gradio as gr

    from . import img2img, models, pnginfo, txt2img
    from engine import OutputStore

    from .common import AppContext, Interrupts, model_defaults_updates, resolution_choices
    from .hires import FROM_SCALE, resize_choices

    ctx = AppContext(engine=engine, outputs=outputs or OutputStore(settings.outputs), interrupts=Interrupts(),
                     concurrency=settings.concurrency, limiter=limiter)
    infos = engine.models()
    choices = [(m.title if m.title == m.id else f"{m.title} ({m.id})", m.id) for m in infos]
    backend = engine.backend
    # Gradio keeps every upload and every gallery image in its cache: drop files older than a day,
    # checking hourly, so a long-running server does not fill its disk.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        with gr.Row(elem_id="header_row", equal_height=True):
            model = gr.Dropdown(choices, value=engine.registry.default_model, label="Stable Diffusion checkpoint",
                                elem_id="sd_model_checkpoint", allow_custom_value=True, scale=1, min_width=260)
            gr.Markdown(f"**{backend.name}** backend on `{backend.device}`"
                        + (" · compiled sizes only" if backend.fixed_shape else " · any size"),
                        elem_id="header_backend", scale=2)
        with gr.Tabs(elem_id="tabs") as tabs:
            t2i = txt2img.build(ctx, model)
            i2i = img2img.build(ctx, model)
            pnginfo.build(ctx, tabs, model, t2i, i2i)
            models.build(ctx)

        def resolutions(model_id: str, t2i_size: str, i2i_size: str, hires_size: str) -> tuple[Any, ...]:
            """A new model offers its own compiled sizes (keeping the chosen one if it has it)."""
            info = ctx.model_info(model_id)
            sizes = resolution_choices(info, ctx.fixed_shape)
            resize = resize_choices(info, ctx.fixed_shape)
            return (*(gr.update(choices=sizes, value=value if value in sizes else (sizes[0] if sizes else None))
                      for value in (t2i_size, i2i_size)),
                    gr.update(choices=resize, value=hires_size if hires_size in resize else FROM_SCALE))

        def defaults(model_id: str) -> dict[Any, Any]:
            """Picking a model fills in its registry defaults (sampler, steps, CFG, size)."""
            return {**model_defaults_updates(ctx, t2i, model_id), **model_defaults_updates(ctx, i2i, model_id)}

        model.change(resolutions, inputs=[model, t2i.resolution, i2i.resolution, t2i.hires.resize_to],
                     outputs=[t2i.resolution, i2i.resolution, t2i.hires.resize_to], api_visibility="private",
                     queue=False)
        model.input(defaults, inputs=model, api_visibility="private", queue=False,
                    outputs=[t2i.width, t2i.height, t2i.sampler, t2i.steps, t2i.cfg_scale,
                             i2i.width, i2i.height, i2i.sampler, i2i.steps, i2i.cfg_scale])
    demo.queue(default_concurrency_limit=settings.concurrency)
    return demo


__all__ = ["build_app", "launch_styles", "TITLE"]
