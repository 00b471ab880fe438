"""The studio's page: five tabs (Data, Train, Test, Chat, Ship) laid out with Gradio.

This module only lays out components and connects them to the studio's steps (studio.data, runs,
evaluate, chat, ship), which call the CLI's own functions. A LiandanError becomes a message on the page.
"""

from __future__ import annotations

import html
import inspect
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from liandan.data.docs import CHUNK_TOKENS, OVERLAP_TOKENS
from liandan.errors import LiandanError
from liandan.export.quantize import OUTTYPES
from liandan.studio import chat, data, evaluate, runs, ship

EMBEDDED = "embedded SmolLM2-135M-Instruct"
MODEL_KINDS = (EMBEDDED, "local directory", ".gguf file", "Hub id")
SERIES_COLORS = {"train": "#2563eb", "validation": "#f97316"}
CSS = """
#check-report textarea, #console textarea, #test-report textarea { font-family: var(--font-mono); font-size: 0.85em; }
.example pre { white-space: pre-wrap; font-size: 0.9em; margin: 0 0 0.6em; }
.example .where { color: var(--body-text-color-subdued); font-size: 0.8em; }
mark.trained { background: #c6f6d5; color: #1a202c; border-radius: 2px; }
#progress .bar { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
#progress .fill { height: 100%; background: var(--color-accent); }
"""


def build(workspace: Path) -> gr.Blocks:
    workspace = Path(workspace).resolve()
    with gr.Blocks(title="liandan studio") as page:
        gr.Markdown(f"## liandan studio 炼丹\nFrom your data to a fine-tuned model you can talk to. Workspace: `{workspace}`")
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data_tab = _data_tab(workspace)
            with gr.Tab("Train", id="train"):
                train_tab = _train_tab(workspace, data_tab)
            with gr.Tab("Test", id="test"):
                _test_tab(workspace, train_tab)
            with gr.Tab("Chat", id="chat"):
                _chat_tab(workspace, train_tab)
            with gr.Tab("Ship", id="ship"):
                _ship_tab(workspace, train_tab)
        _wire_data(workspace, data_tab, train_tab)
        # A reopened page shows the latest run again, with the options it was started with.
        page.load(lambda: _restore(workspace), outputs=[train_tab.run_name, data_tab.folder, train_tab.model_kind,
                                                        train_tab.model_path, *train_tab.options])
    return page


def _model_spec(kind: str, path: str) -> str | None:
    if kind == EMBEDDED:
        return None
    if not path.strip():
        raise LiandanError(f"model: give the {kind}")
    return path.strip()


def _restore(workspace: Path) -> list:
    found = runs.list_runs(workspace / "runs")
    if not found:
        return [gr.skip()] * (4 + len(runs.PAGE_OPTIONS))
    options = runs.read_run(found[0])["options"]
    model = options.get("model")
    kind = EMBEDDED if not model else ".gguf file" if model.endswith(".gguf") else (
        "local directory" if Path(model).expanduser().exists() else "Hub id")
    return [found[0].name, options.get("data", ""), kind, model or "",
            *(options.get(name, gr.skip()) for name in runs.PAGE_OPTIONS)]


def _run_dir(workspace: Path, name: str) -> Path:
    return workspace / "runs" / _plain(name, "run name")


# ---------------------------------------------------------------- Data
def _data_tab(workspace: Path) -> SimpleNamespace:
    from liandan.data.prepare import OUTPUT_FORMATS, SPLIT_RATIOS

    t = SimpleNamespace(staged=gr.State(None))
    with gr.Row():
        t.upload = gr.File(label="Upload train/valid/test.jsonl, or tables to prepare (JSONL, JSON, CSV, Parquet)",
                           file_count="multiple", file_types=list(data.TABLE_SUFFIXES), elem_id="upload")
        with gr.Column():
            t.name = gr.Textbox("uploaded", label="Name for uploaded data (saved in workspace/data/NAME)")
            t.folder = gr.Textbox(label="Data folder (train.jsonl, valid.jsonl, test.jsonl)", elem_id="data-folder")
            t.check = gr.Button("Check", elem_id="check")
    t.status = gr.Markdown(elem_id="data-status")
    with gr.Row():
        t.report = gr.Textbox(label="liandan data check", lines=14, max_lines=22, interactive=False, scale=3,
                              elem_id="check-report")
        with gr.Column(scale=2):
            gr.Markdown("**Training examples as the model sees them** (chat template and stop token included; "
                        "<mark class='trained'>highlighted</mark>: the tokens trained on)")
            t.examples = gr.HTML(elem_id="examples")
    with gr.Accordion("Prepare: tables with any field names → train/valid/test.jsonl", open=False):
        with gr.Row():
            t.fmt = gr.Radio(list(OUTPUT_FORMATS), value=OUTPUT_FORMATS[0], label="Format")
            t.prompt = gr.Textbox(label="Prompt field or {Template}", placeholder="guessed: prompt, question, instruction…")
            t.completion = gr.Textbox(label="Answer field or {Template}", placeholder="guessed: completion, answer, response…")
            t.text = gr.Textbox(label="Text field (format text)")
        with gr.Row():
            t.valid_ratio = gr.Number(SPLIT_RATIOS["valid"], label="Valid ratio")
            t.test_ratio = gr.Number(SPLIT_RATIOS["test"], label="Test ratio")
            t.seed = gr.Number(0, label="Seed", precision=0)
            t.prepare = gr.Button("Prepare the uploaded tables", elem_id="prepare")
    with gr.Accordion("From documents: a folder of Markdown, text or HTML → text chunks", open=False):
        with gr.Row():
            t.docs = gr.Textbox(label="Documents folder", elem_id="docs-folder")
            t.chunk_tokens = gr.Number(CHUNK_TOKENS, label="Chunk tokens", precision=0)
            t.overlap = gr.Number(OVERLAP_TOKENS, label="Overlap tokens", precision=0)
            t.from_docs = gr.Button("Make training text", elem_id="from-docs")
    return t


def _check_outputs(folder: Path, model: str | None, staged: bool = False, saved: str = "") -> tuple:
    view = data.check_data(folder, model, hide=str(folder))  # the folder is on the page already
    train = Path(folder) / "train.jsonl"
    examples = data.rendered_examples(train, model) if train.is_file() and not staged else ""
    verdict = (f"✗ {view.errors} error(s), {view.warnings} warning(s)" if view.errors
               else f"✓ no errors, {view.warnings} warning(s)")
    formats = ", ".join(f"{name}: {fmt or 'unknown'}" for name, fmt in view.formats.items())
    return f"**{verdict}** — {formats}{saved}", view.text, examples


def _wire_data(workspace: Path, t: SimpleNamespace, train: SimpleNamespace) -> None:
    model = [train.model_kind, train.model_path]

    def on_upload(files, name, kind, path):
        if not files:
            return gr.skip()
        data.require_new_data_dir(workspace / "data" / _plain(name))
        staging = data.stage(files)
        spec = _model_spec(kind, path)
        if not data.is_split_dir(staging):
            errors = data.validate_tables(staging)
            if errors:
                shutil.rmtree(staging)
                return f"**✗ {len(errors)} file(s) with errors; nothing was saved**", "\n".join(errors), "", gr.skip(), None
            names = ", ".join(p.name for p in sorted(staging.iterdir()))
            return (f"Tables read without errors: {names}. Turn them into train/valid/test.jsonl with **Prepare** below.",
                    "", "", gr.skip(), str(staging))
        status, report, _ = _check_outputs(staging, spec, staged=True)
        if status.startswith("**✗"):
            shutil.rmtree(staging)
            return status + "; nothing was saved", report, "", gr.skip(), None
        out = data.save_split_dir(staging, workspace / "data" / _plain(name))
        shutil.rmtree(staging)
        status, report, examples = _check_outputs(out, spec, saved=f" — saved in `{out}`")
        return status, report, examples, str(out), None

    outputs = [t.status, t.report, t.examples, t.folder, t.staged]
    t.upload.upload(_shown(on_upload), [t.upload, t.name, *model], outputs)
    def on_check(folder, kind, path):
        if not (folder or "").strip():  # Path("") is the studio's own working directory
            raise LiandanError("choose a data folder first (upload, or type its path)")
        return _check_outputs(Path(folder.strip()), _model_spec(kind, path))

    t.check.click(_shown(on_check), [t.folder, *model], [t.status, t.report, t.examples])

    def on_prepare(staged, name, fmt, prompt, completion, text, valid, test, seed, kind, path):
        if not staged:
            raise LiandanError("upload the tables to prepare first")
        out = workspace / "data" / _plain(name)
        said = data.prepare_tables(sorted(Path(staged).iterdir()), out, fmt, valid, test, int(seed),
                                   prompt=prompt, completion=completion, text=text)
        status, report, examples = _check_outputs(out, _model_spec(kind, path))
        return status, said + "\n\n" + report, examples, str(out)

    t.prepare.click(_shown(on_prepare), [t.staged, t.name, t.fmt, t.prompt, t.completion, t.text, t.valid_ratio,
                                         t.test_ratio, t.seed, *model], [t.status, t.report, t.examples, t.folder])

    def on_docs(source, name, chunk, overlap, kind, path):
        out = workspace / "data" / _plain(name)
        said = data.docs_to_data(Path(source.strip()), out, _model_spec(kind, path), int(chunk), int(overlap))
        status, report, examples = _check_outputs(out, _model_spec(kind, path))
        return status, said + "\n\n" + report, examples, str(out)

    t.from_docs.click(_shown(on_docs), [t.docs, t.name, t.chunk_tokens, t.overlap, *model],
                      [t.status, t.report, t.examples, t.folder])


def _plain(name: str, what: str = "data name") -> str:
    """A run or data name from the page: one folder inside the workspace, never a path out of it."""
    name = (name or "").strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise LiandanError(f"{what} {name!r}: use a plain folder name")
    return name


def _shown(fn):
    """Turn a LiandanError into a message on the page (the server keeps serving)."""
    if inspect.isgeneratorfunction(fn):  # Gradio streams a generator's updates; keep it one
        def streaming(*args):
            try:
                yield from fn(*args)
            except LiandanError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        return streaming

    def wrapper(*args):
        try:
            return fn(*args)
        except LiandanError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapper


# ---------------------------------------------------------------- Train
def _train_tab(workspace: Path, data_tab: SimpleNamespace) -> SimpleNamespace:
    from liandan.config import RULES, TrainConfig

    d = TrainConfig()
    t = SimpleNamespace(data_folder=data_tab.folder)
    with gr.Row():
        t.model_kind = gr.Radio(list(MODEL_KINDS), value=EMBEDDED, label="Model")
        t.model_path = gr.Textbox(label="Directory, .gguf file or Hub id", placeholder="Qwen/Qwen2.5-0.5B-Instruct")
    with gr.Row():
        t.run_name = gr.Textbox("run1", label="Run name (adapters in workspace/runs/NAME)", elem_id="run-name")
        t.iters = gr.Number(d.iters, label="Iterations", precision=0, elem_id="iters")
        t.batch_size = gr.Number(d.batch_size, label="Batch size", precision=0, elem_id="batch-size")
        t.learning_rate = gr.Number(d.learning_rate, label="Learning rate", elem_id="learning-rate")
        t.fine_tune_type = gr.Dropdown(list(RULES["fine_tune_type"].choices), value=d.fine_tune_type, label="Fine-tune type")
        t.num_layers = gr.Number(d.num_layers, label="Layers (from the top, -1: all)", precision=0)
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            t.steps_per_report = gr.Number(d.steps_per_report, label="Steps per report", precision=0, elem_id="steps-per-report")
            t.steps_per_eval = gr.Number(d.steps_per_eval, label="Steps per validation", precision=0, elem_id="steps-per-eval")
            t.val_batches = gr.Number(d.val_batches, label="Validation batches (-1: all)", precision=0, elem_id="val-batches")
            t.save_every = gr.Number(d.save_every, label="Save every", precision=0, elem_id="save-every")
            t.max_seq_length = gr.Number(d.max_seq_length, label="Max sequence length", precision=0)
            t.seed = gr.Number(d.seed, label="Seed", precision=0)
        with gr.Row():
            t.optimizer = gr.Dropdown(list(RULES["optimizer"].choices), value=d.optimizer, label="Optimizer")
            t.batch_order = gr.Dropdown(list(RULES["batch_order"].choices), value=d.batch_order, label="Batch order")
            t.grad_accumulation_steps = gr.Number(d.grad_accumulation_steps, label="Gradient accumulation", precision=0)
            t.replay_ratio = gr.Number(d.replay_ratio, label="Replay ratio (against forgetting; 0: off)")
            t.kl_weight = gr.Number(d.kl_weight, label="KL weight")
        with gr.Row():
            t.system_prompt = gr.Textbox(label="System prompt")
            t.mask_prompt = gr.Checkbox(d.mask_prompt, label="Train on answers only (mask the prompt)")
            t.grad_checkpoint = gr.Checkbox(d.grad_checkpoint, label="Gradient checkpointing")
            t.overwrite = gr.Checkbox(False, label="Replace the adapter already in this run's folder")
    with gr.Row():
        t.start = gr.Button("Start", variant="primary", elem_id="start")
        t.stop = gr.Button("Stop (keeps a checkpoint)", variant="stop", elem_id="stop")
        t.resume = gr.Button("Resume", elem_id="resume")
    t.progress = gr.HTML(elem_id="progress")
    t.chart = gr.LinePlot(x="iteration", y="loss", color="series", color_map=SERIES_COLORS,
                          label="Loss (mean NLL per trained token)", elem_id="loss-chart")
    t.console = gr.Textbox(label="Console (liandan lora)", lines=12, max_lines=12, autoscroll=True, interactive=False,
                           elem_id="console")
    t.options = [getattr(t, name) for name in runs.PAGE_OPTIONS]
    _wire_train(workspace, t)
    return t


def _wire_train(workspace: Path, t: SimpleNamespace) -> None:
    def on_start(name, folder, kind, path, *values):
        if not (folder or "").strip():
            raise LiandanError("choose the data first (Data tab)")
        options = dict(zip(runs.PAGE_OPTIONS, values), data=str(Path(folder.strip()).resolve()), model=_model_spec(kind, path))
        options = {k: (int(v) if isinstance(v, float) and v.is_integer() and k != "learning_rate" else v)
                   for k, v in options.items()}
        run_dir = _run_dir(workspace, name)
        chat.forget(run_dir)
        runs.start(run_dir, options)
        return show(name)

    def on_stop(name):
        runs.stop(_run_dir(workspace, name))
        return show(name)

    def on_resume(name):
        run_dir = _run_dir(workspace, name)
        chat.forget(run_dir)
        runs.resume(run_dir)
        return show(name)

    def show(name):
        try:
            run_dir = _run_dir(workspace, name)
        except LiandanError:
            return "", None, ""
        state = runs.status(run_dir)
        return _progress_html(state), _loss_frame(state), state.log

    outputs = [t.progress, t.chart, t.console]
    t.start.click(_shown(on_start), [t.run_name, t.data_folder, t.model_kind, t.model_path, *t.options], outputs)
    t.stop.click(_shown(on_stop), [t.run_name], outputs)
    t.resume.click(_shown(on_resume), [t.run_name], outputs)
    t.run_name.change(show, [t.run_name], outputs)
    shown = gr.State(None)

    def refresh(name, last):
        """The timer's update: nothing is sent while nothing changed (the chart is redrawn only when it did)."""
        try:
            state = runs.status(_run_dir(workspace, name))
        except LiandanError:
            return gr.skip(), gr.skip(), gr.skip(), last
        now = (name, state.state, len(state.train_loss), len(state.val_loss), len(state.log))
        if now == last:
            return gr.skip(), gr.skip(), gr.skip(), last
        return _progress_html(state), _loss_frame(state), state.log, now

    gr.Timer(2.0).tick(refresh, [t.run_name, shown], [*outputs, shown])


def _progress_html(state: runs.RunStatus) -> str:
    if state.state == "none":
        return "<p>No run yet: choose data, set the options and press Start.</p>"
    share = min(state.iteration / max(state.iters, 1), 1.0)
    facts = [f"iteration {state.iteration}/{state.iters}"]
    if state.eta_seconds is not None:
        minutes, seconds = divmod(int(state.eta_seconds), 60)
        facts.append(f"ETA {minutes}m{seconds:02d}s")
    if state.tokens_per_sec:
        facts.append(f"{state.tokens_per_sec:.1f} tokens/s")
    if state.train_loss:
        facts.append(f"train loss {state.train_loss[-1][1]:.3f}")
    if state.val_loss:
        facts.append(f"validation loss {state.val_loss[-1][1]:.3f}")
    return (f'<div class="bar"><div class="fill" style="width:{100 * share:.1f}%"></div></div>'
            f'<p><b>{state.state}</b> · {html.escape(" · ".join(facts))}</p>')


def _loss_frame(state: runs.RunStatus):
    import pandas as pd

    rows = [(it, loss, "train") for it, loss in state.train_loss] + [(it, loss, "validation") for it, loss in state.val_loss]
    # Gradio 6's chart keeps the series of the first frame with data: name both from the start (a blank point).
    rows += [(1, float("nan"), series) for series, points in (("train", state.train_loss), ("validation", state.val_loss))
             if not points]
    # Numeric types even when empty: the chart keeps the axis types of the first frame it gets.
    return pd.DataFrame(rows, columns=["iteration", "loss", "series"]).astype({"iteration": "int64", "loss": "float64"})


# ---------------------------------------------------------------- Test
def _test_tab(workspace: Path, train: SimpleNamespace) -> None:
    gr.Markdown("Tests the run named in the Train tab on its data's test.jsonl: exact answers (greedy, must stop), "
                "general knowledge kept, test loss and perplexity.")
    button = gr.Button("Test the adapter", variant="primary", elem_id="run-test")
    summary = gr.Markdown(elem_id="test-summary")
    details = gr.Textbox(label="Report (liandan lora --test)", lines=12, interactive=False, elem_id="test-report")

    def on_test(name):
        run_dir = _run_dir(workspace, name)
        options = runs.read_run(run_dir).get("options", {})
        if not options.get("data"):
            raise LiandanError(f"{run_dir}: no run started from the studio here")
        report = evaluate.test_adapter(run_dir, Path(options["data"]), options)
        from liandan.evaluate import LOSS_EXPLAINED

        lines = [f"| exact answers | {report.exact or '–'} |", f"| general knowledge kept | {report.retention or '–'} |"]
        if report.loss_and_perplexity:
            lines += [f"| test loss | {report.loss_and_perplexity[0]} |", f"| perplexity | {report.loss_and_perplexity[1]} |"]
        return f"| run `{run_dir.name}` | |\n|---|---|\n" + "\n".join(lines) + f"\n\n{LOSS_EXPLAINED}", "\n".join(report.lines)

    button.click(_shown(on_test), [train.run_name], [summary, details])


# ---------------------------------------------------------------- Chat
def _chat_tab(workspace: Path, train: SimpleNamespace) -> None:
    with gr.Row():
        tuned = gr.Chatbot(label="fine-tuned (the run's adapter)", height=320, elem_id="chat-adapter")
        base = gr.Chatbot(label="base model, for comparison", height=320, elem_id="chat-base")
    with gr.Row():
        message = gr.Textbox(label="Message", scale=4, elem_id="chat-input")
        compare = gr.Checkbox(True, label="Also ask the base model")
        max_tokens = gr.Number(256, label="Max tokens", precision=0, elem_id="max-tokens")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear")
    info = gr.Markdown(elem_id="chat-info")

    def on_send(name, text, tuned_history, base_history, ask_base, budget):
        run_dir = _run_dir(workspace, name)
        panes = [(chat.pipeline(run_dir), list(tuned_history or []))]
        if ask_base:
            panes.append((chat.pipeline(run_dir, base=True), list(base_history or [])))
        notes = [f"Run `{run_dir.name}`:"]
        for index, (pipe, history) in enumerate(panes):
            history.append({"role": "user", "content": text})
            for reply, stopped in chat.answer(pipe, history, int(budget)):
                shown = history + [{"role": "assistant", "content": reply}]
                out = [shown, base_history] if index == 0 else [panes[0][1], shown]
                yield *out, "\n".join(notes)
            history.append({"role": "assistant", "content": reply})
            end = f"stopped at `{' / '.join(chat.stop_tokens(pipe))}`" if stopped else f"no stop token within {budget} tokens"
            notes.append(f"- {'fine-tuned' if index == 0 else 'base'}: rendered with the training chat template; {end}")
            yield panes[0][1], (panes[1][1] if len(panes) > 1 else base_history), "\n".join(notes)

    for event in (send.click, message.submit):
        event(_shown(on_send), [train.run_name, message, tuned, base, compare, max_tokens], [tuned, base, info])
    clear.click(lambda: ([], [], ""), None, [tuned, base, info])


# ---------------------------------------------------------------- Ship
def _ship_tab(workspace: Path, train: SimpleNamespace) -> None:
    gr.Markdown("Merge the run's adapter into its base model, then export a GGUF (llama.cpp) or an Ollama model.")
    fuse = gr.Button("Fuse", elem_id="fuse")
    log = gr.Markdown(elem_id="ship-log")
    with gr.Row():
        outtype = gr.Dropdown(list(OUTTYPES), value="q8_0", label="GGUF tensor type", elem_id="outtype",
                              info="k-quants (q4_k_m, …) are made by llama.cpp's quantizer: liandan[llama]")
        name = gr.Textbox("jokes", label="Ollama model name", elem_id="ollama-name")
    with gr.Row():
        gguf = gr.Button("Export GGUF", elem_id="export-gguf")
        ollama = gr.Button("Export for Ollama", variant="primary", elem_id="export-ollama")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="ship-files")
    modelfile = gr.Code(label="Modelfile", lines=8, elem_id="modelfile")
    command = gr.Textbox(label="Import into Ollama (copy and run where the Modelfile is)", buttons=["copy"],
                         interactive=False, elem_id="ollama-command")

    def ship_dir(run):
        return workspace / "ship" / _run_dir(workspace, run).name

    def fused(run):
        return ship.fused_for(_run_dir(workspace, run), ship_dir(run))

    def on_fuse(run):
        return ship.fuse_run(_run_dir(workspace, run), ship_dir(run))

    def on_gguf(run, kind):
        path = ship.export_gguf(fused(run), kind)
        return f"Wrote `{path}`", [str(path)]

    def on_ollama(run, kind, model_name):
        path, gguf_path, line = ship.export_ollama(fused(run), model_name.strip(), kind)
        return f"Wrote `{path.parent}`", [str(gguf_path), str(path)], path.read_text(encoding="utf-8"), line

    fuse.click(_shown(on_fuse), [train.run_name], [log])
    gguf.click(_shown(on_gguf), [train.run_name, outtype], [log, files])
    ollama.click(_shown(on_ollama), [train.run_name, outtype, name], [log, files, modelfile, command])
