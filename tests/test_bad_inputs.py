"""The bad-input corpus: broken recipe keys, overrides, data files, plugin blocks, task options and run folders.

For every case, ``tokplug run`` (and ``tokplug validate``, which must catch the same thing) exits 2 with one message
that names the key or file, prints no traceback, and leaves the output folder exactly as it was (absent, or with
its previous files byte for byte). A property-based part feeds random values to recipe keys and asserts the same
contract whenever the value is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import base_recipe, write_recipe
from hf_tokplug.cli import main

# ------------------------------------------------------------------------------------------------ the contract


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def assert_refused(capsys, argv: list[str], out: Path, expected: str, *, also_validate: bool = True) -> str:
    before = snapshot(out)
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, f"exit {code} for {argv}: {err}"
    assert err.startswith("error: ") and sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    assert "Traceback" not in err, err
    assert expected.lower() in err.lower(), f"expected {expected!r} in: {err}"
    assert snapshot(out) == before, "the output folder changed"
    if also_validate and argv[0] == "run":
        code = main(["validate", *argv[1:]])
        verr = capsys.readouterr().err
        assert code == 2 and "Traceback" not in verr and expected.lower() in verr.lower(), \
            f"validate let it through ({code}): {verr}"
        assert snapshot(out) == before
    return err


# ------------------------------------------------------------------------------------------------ data files


def _jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


DATA_FILES: dict[str, bytes] = {
    "empty.jsonl": b"",
    "malformed.jsonl": b'{"text": "in the beginning"}\n{"text": "and the earth\n',
    "binary.jsonl": bytes(range(256)) * 8,
    "text.jsonl": _jsonl([{"text": f"verse {i}"} for i in range(8)]).encode(),
    "chat.jsonl": _jsonl([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 8).encode(),
    "odd_columns.jsonl": _jsonl([{"question": "q", "reply": "a"}] * 8).encode(),
    "lists.jsonl": b"[1, 2]\n[3, 4]\n",
    "latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1"),
    "bad.csv": b'a,b\n1,"unclosed\n',
    "nulls.jsonl": b"null\nnull\n",
    "prompt_only.jsonl": _jsonl([{"prompt": "p"}] * 8).encode(),
}


def data_file(tmp: Path, name: str) -> str:
    path = tmp / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(DATA_FILES[name])
    return str(path)


# ------------------------------------------------------------------------------------------------ cases
# (id, overrides builder (tmp -> list of overrides), text the error must contain)

Case = tuple[str, Callable[[Path], list[str]], str]


def o(*items: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(items)


def d(name: str, *extra: str, key: str = "data.train") -> Callable[[Path], list[str]]:
    return lambda tmp: [f"{key}={data_file(tmp, name)}", *extra]


CASES: list[Case] = [
    # ---- top level and task
    ("task-unknown", o("task=causal_lm_sftt"), "unknown task"),
    ("task-list", o("task=[a, b]"), "task"),
    ("task-missing", o("~task"), "task: required key is missing"),
    ("top-unknown-key", o("modle={}"), "did you mean 'model'"),
    ("overwrite-on", o("overwrite=on"), "overwrite"),
    ("overwrite-yes", o("overwrite=yes"), "overwrite"),
    ("overwrite-1", o("overwrite=1"), "overwrite"),
    ("output-dir-empty", o("output_dir=' '"), "output_dir"),
    ("output-dir-list", o("output_dir=[a]"), "output_dir"),
    ("plugins-list", o("plugins=[zloss]"), "plugins"),
    ("train-list", o("train=[1]"), "train"),
    ("task-options-for-sft", o("task_options={x: 1}"), "takes no task_options"),
    # ---- model
    ("model-missing", o("~model"), "model: required key is missing"),
    ("model-unknown-toy", o("model.name_or_path=toy://llamma"), "unknown embedded model"),
    ("model-missing-local-path", o("model.name_or_path=./models/none"), "nothing there"),
    ("model-deep-path", o("model.name_or_path=models/a/b"), "nothing there"),
    ("model-invalid-hub-id", o("model.name_or_path='not a repo'"), "nor a valid hub id"),
    ("model-uncached-hub-id", o("model.name_or_path=someone/uncached-model"), "not in the local cache"),
    ("model-relative-path-as-hub-id", o("model.name_or_path=my_models/tiny"), "my_models/tiny"),
    ("model-task-mismatch", o("task=masked_diffusion_sft"), "attends causally"),
    ("model-task-mismatch-classifier", o("task=sequence_classification", "model.name_or_path=toy://sd"), "model"),
    ("model-dtype", o("model.dtype=fp8"), "model.dtype"),
    ("model-attn", o("model.attn_implementation=eagr"), "did you mean 'eager'"),
    ("model-attn-flash1", o("model.attn_implementation=flash_attention_1"), "unknown attention implementation"),
    ("model-tokenizer-missing", o("model.tokenizer=./tok/none"), "model.tokenizer"),
    ("model-tokenizer-toy", o("model.tokenizer=toy://tokenizer/nope"), "model.tokenizer"),
    ("model-trust-yes", o("model.trust_remote_code=yes"), "trust_remote_code"),
    ("model-trust-on", o("model.trust_remote_code=on"), "trust_remote_code"),
    ("model-pad-negative", o("model.pad_to_multiple_of=-8"), "pad_to_multiple_of"),
    ("model-pad-zero", o("model.pad_to_multiple_of=0"), "pad_to_multiple_of"),
    ("model-pad-text", o("model.pad_to_multiple_of=eight"), "pad_to_multiple_of"),
    ("model-kwargs-list", o("model.kwargs=[1]"), "model.kwargs"),
    ("model-unknown-key", o("model.revison=main"), "did you mean 'revision'"),
    ("model-name-list", o("model.name_or_path=[a]"), "name_or_path"),
    # ---- data keys
    ("data-train-missing", o("~data.train"), "needs training data"),
    ("data-unknown-toy", o("data.train=toy://kjv-chatt"), "unknown embedded dataset"),
    ("data-missing-file", o("data.train=nope/train.jsonl"), "data file not found"),
    ("data-missing-folder", o("data.train=./no/such/folder"), "dataset folder not found"),
    ("data-format-bad", o("data.format=sharegpt"), "data.format"),
    ("data-max-length-negative", o("data.max_length=-1"), "max_length"),
    ("data-max-length-zero", o("data.max_length=0"), "max_length"),
    ("data-max-samples-zero", o("data.max_samples=0"), "max_samples"),
    ("data-max-samples-text", o("data.max_samples=all"), "max_samples"),
    ("data-eval-size-5.0", o("data.eval_size=5.0"), "eval_size"),
    ("data-eval-size-zero", o("data.eval_size=0"), "eval_size"),
    ("data-eval-size-negative", o("data.eval_size=-0.1"), "eval_size"),
    ("data-eval-size-1.5", o("data.eval_size=1.5"), "eval_size"),
    ("data-eval-size-1.0", o("data.eval_size=1.0"), "eval_size"),
    ("data-eval-size-all", o("data.eval_size=100000"), "leaves no training examples"),
    ("data-eval-size-text", o("data.eval_size=tenth"), "eval_size"),
    ("data-assistant-on", o("data.assistant_only_loss=on"), "assistant_only_loss"),
    ("data-completion-yes", o("data.completion_only_loss=yes"), "completion_only_loss"),
    ("data-unknown-key", o("data.max_lenght=5"), "did you mean 'max_length'"),
    ("data-split-unknown-toy", o("data.train={path: toy://kjv-chat, split: validation}"), "split"),
    ("data-spec-unknown-key", o("data.train={path: toy://kjv-chat, splt: train}"), "did you mean 'split'"),
    ("data-text-field-missing", d("text.jsonl", "data.text_field=body"), "body"),
    # ---- data files
    ("file-empty", d("empty.jsonl"), "empty.jsonl"),
    ("file-malformed", d("malformed.jsonl"), "malformed.jsonl"),
    ("file-binary", d("binary.jsonl"), "binary file"),
    ("file-lists", d("lists.jsonl"), "lists.jsonl"),
    ("file-latin1", d("latin1.jsonl"), "not UTF-8"),
    ("file-nulls", d("nulls.jsonl"), "nulls.jsonl"),
    ("file-bad-csv", d("bad.csv"), "bad.csv"),
    ("file-odd-columns", d("odd_columns.jsonl"), "cannot tell the data format"),
    ("file-prompt-only", d("prompt_only.jsonl"), "cannot tell the data format"),
    ("file-chat-format-on-text", d("text.jsonl", "data.format=chat"), "needs column(s) ['messages']"),
    ("file-pc-format-on-chat", d("chat.jsonl", "data.format=prompt_completion"), "needs column(s)"),
    ("file-text-format-on-chat", d("chat.jsonl", "data.format=text"), "needs column(s) ['text']"),
    ("file-unknown-split", lambda tmp: [f"data.train={{path: {data_file(tmp, 'text.jsonl')}, split: test}}"], "split"),
    ("file-eval-malformed", d("malformed.jsonl", key="data.eval"), "data.eval"),
    ("file-eval-empty", d("empty.jsonl", key="data.eval"), "data.eval"),
    ("file-eval-wrong-format", d("odd_columns.jsonl", key="data.eval"), "data.eval"),
    ("file-data-files-missing", o("data.train={path: json, data_files: [a.jsonl, b.jsonl]}"), "data file not found"),
    # ---- adapter
    ("adapter-r-zero", o("adapter={r: 0}"), "adapter.r"),
    ("adapter-r-text", o("adapter={r: many}"), "adapter.r"),
    ("adapter-dropout-1.5", o("adapter={dropout: 1.5}"), "adapter.dropout"),
    ("adapter-dropout-negative", o("adapter={dropout: -0.1}"), "adapter.dropout"),
    ("adapter-type", o("adapter={type: ia3}"), "adapter.type"),
    ("adapter-targets-nothing", o("adapter={target_modules: [q_projj, v_projj]}"), "match no module"),
    ("adapter-target-regex-nothing", o("adapter={target_modules: '.*nothing.*'}"), "match no module"),
    ("adapter-unknown-key", o("adapter={rank: 4}"), "unknown key"),
    ("adapter-modules-to-save-str", o("adapter={modules_to_save: lm_head}"), "modules_to_save"),
    ("adapter-kwargs-list", o("adapter={kwargs: [1]}"), "adapter.kwargs"),
    # ---- trainer arguments
    ("train-batch-zero", o("train.per_device_train_batch_size=0"), "per_device_train_batch_size"),
    ("train-batch-negative", o("train.per_device_train_batch_size=-2"), "per_device_train_batch_size"),
    ("train-eval-batch-zero", o("train.per_device_eval_batch_size=0"), "per_device_eval_batch_size"),
    ("train-grad-accum-zero", o("train.gradient_accumulation_steps=0"), "gradient_accumulation_steps"),
    ("train-lr-negative", o("train.learning_rate=-1e-4"), "learning_rate"),
    ("train-lr-text", o("train.learning_rate=fast"), "learning_rate"),
    ("train-max-steps-negative", o("train.max_steps=-5"), "max_steps"),
    ("train-max-steps-zero", o("train.max_steps=0"), "max_steps"),
    ("train-max-steps-text", o("train.max_steps=ten"), "max_steps"),
    ("train-max-steps-float", o("train.max_steps=2.5"), "max_steps"),
    ("train-epochs-zero", o("~train.max_steps", "train.num_train_epochs=0"), "num_train_epochs"),
    ("train-save-steps-zero", o("train.save_strategy=steps", "train.save_steps=0"), "save_steps"),
    ("train-logging-steps-negative", o("train.logging_steps=-1"), "logging_steps"),
    ("train-warmup-negative", o("train.warmup_steps=-3"), "warmup_steps"),
    ("train-weight-decay-negative", o("train.weight_decay=-0.1"), "weight_decay"),
    ("train-save-total-limit-zero", o("train.save_total_limit=0"), "save_total_limit"),
    ("train-grad-norm-negative", o("train.max_grad_norm=-1"), "max_grad_norm"),
    ("train-workers-negative", o("train.dataloader_num_workers=-1"), "dataloader_num_workers"),
    ("train-seed-text", o("train.seed=abc"), "seed"),
    ("train-seed-bool", o("train.seed=true"), "seed"),
    ("train-seed-float", o("train.seed=1.5"), "seed"),
    ("train-eval-steps-no-eval", o("train.eval_strategy=steps", "train.eval_steps=2"), "no evaluation data"),
    ("train-eval-epoch-no-eval", o("train.eval_strategy=epoch"), "no evaluation data"),
    ("train-best-model-no-eval", o("train.load_best_model_at_end=true"), "no evaluation data"),
    ("train-packing", o("train.packing=true"), "packing"),
    ("train-padding-free", o("train.padding_free=true"), "padding_free"),
    ("train-report-to-missing", o("train.report_to=wandb"), "not installed"),
    ("train-report-to-list-missing", o("train.report_to=[tensorboard, mlflow]"), "not installed"),
    ("train-report-to-unknown", o("train.report_to=weights_and_biases"), "unknown report_to"),
    ("train-unknown-key", o("train.max_stepz=3"), "did you mean 'max_steps'"),
    ("train-output-dir", o("train.output_dir=x"), "top level"),
    ("train-bf16-text", o("train.bf16=maybe"), "bf16"),
    ("train-lr-list", o("train.learning_rate=[1, 2]"), "learning_rate"),
    ("train-resume-missing-path", o("train.resume_from_checkpoint=./no/checkpoint-3"), "resume_from_checkpoint"),
    ("train-resume-true-nothing", o("train.resume_from_checkpoint=true"), "no complete checkpoint"),
    # ---- plugins
    ("plugin-unknown", o("plugins.zlos={}"), "unknown plugin 'zlos'"),
    ("plugin-option-type", o("plugins.zloss={weight: heavy}"), "plugins.zloss"),
    ("plugin-option-negative", o("plugins.zloss={weight: -1}"), "plugins.zloss"),
    ("plugin-unknown-option", o("plugins.zloss={wieght: 1}"), "plugins.zloss"),
    ("plugin-block-scalar", o("plugins.zloss=5"), "plugins.zloss"),
    ("plugin-block-list", o("plugins.zloss=[1]"), "plugins.zloss"),
    ("plugin-caft-bad", o("plugins.caft={num_heads: -1}"), "caft"),
    ("plugin-rainbow-on-sft", o("plugins.rainbow_padding={}"), "rainbow_padding"),
    ("plugin-tokenadapt-bad", o("plugins.tokenadapt={strategy: magic}"), "tokenadapt"),
    # ---- hub
    ("hub-repo-id-invalid", o("hub.repo_id='bad repo//x'"), "hub.repo_id"),
    ("hub-repo-id-dashes", o("hub.repo_id=-me/x-"), "hub.repo_id"),
    ("hub-private-yes", o("hub.private=yes"), "hub.private"),
    ("hub-unknown-key", o("hub.repo=x/y"), "did you mean 'repo_id'"),
    # ---- overrides syntax
    ("override-no-equals", o("train.max_steps"), "must look like"),
    ("override-empty-key", o("train..max_steps=3"), "empty key"),
    ("override-delete-missing", o("~train.nope"), "cannot delete"),
    ("override-bad-yaml", o("train.max_steps=[1"), "max_steps"),
    ("override-deep", o("a=" + "[" * 200 + "]" * 200), "unknown key"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(case, capsys, tmp_path, monkeypatch):
    _, build, expected = case
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(out))
    assert_refused(capsys, ["run", str(recipe), *build(tmp_path)], out, expected)


# ------------------------------------------------------------------------------------------------ recipe files

RECIPE_TEXTS: dict[str, tuple[bytes, str]] = {
    "not-utf8": ("task: causal_lm_sft\nmodel: {name_or_path: caf\xe9}\n".encode("latin-1"), "not UTF-8"),
    "yaml-syntax": (b"task: causal_lm_sft\nmodel: [\n", "not valid YAML"),
    "duplicate-key": (b"task: causal_lm_sft\ntask: causal_lm_prepare\nmodel: {name_or_path: toy://llama}\n", "duplicate key"),
    "duplicate-nested-key": (b"task: causal_lm_sft\nmodel: {name_or_path: toy://llama, name_or_path: x}\n", "duplicate key"),
    "list": (b"- task\n- model\n", "must be a YAML mapping"),
    "empty": (b"", "must be a YAML mapping"),
    "scalar": (b"hello\n", "must be a YAML mapping"),
    "python-object": (b"task: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "deep-nesting": (b"task: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    "tabs": (b"task: causal_lm_sft\nmodel:\n\tname_or_path: x\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(RECIPE_TEXTS))
def test_broken_recipe_files(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, expected = RECIPE_TEXTS[name]
    path = tmp_path / "broken.yaml"
    path.write_bytes(text)
    assert_refused(capsys, ["run", str(path)], tmp_path / "runs", expected)


def test_missing_recipe_file(capsys, tmp_path):
    assert_refused(capsys, ["run", str(tmp_path / "none.yaml")], tmp_path / "runs", "recipe file not found")


# ------------------------------------------------------------------------------------------------ run folders


def _fake_run(folder: Path, *, checkpoint: bool = True) -> None:
    """A folder as a tokplug run leaves it (a checkpoint and the resolved recipe)."""
    folder.mkdir(parents=True)
    (folder / "recipe.resolved.yaml").write_text("task: causal_lm_sft\n")
    (folder / "run_info.json").write_text(json.dumps({"starts": [], "written": ["model.safetensors"]}))
    (folder / "model.safetensors").write_bytes(b"weights")
    if checkpoint:
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")


RUN_FOLDERS = [
    ("output-dir-is-a-file", lambda out: out.write_text("x"), [], "is a file"),
    ("not-written-by-tokplug", lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")), [], "not written by tokplug"),
    ("not-written-by-tokplug-overwrite", lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")),
     ["overwrite=true"], "not written by tokplug"),
    ("earlier-run-without-overwrite", _fake_run, [], "holds an earlier run"),
    ("resume-true-incomplete-checkpoint", _fake_run, ["train.resume_from_checkpoint=true"], "no complete checkpoint"),
    ("resume-path-not-a-checkpoint", lambda out: (out.mkdir(), (out / "x").mkdir()),
     ["train.resume_from_checkpoint=out/x"], "trainer_state.json"),
]


@pytest.mark.parametrize("case", RUN_FOLDERS, ids=[c[0] for c in RUN_FOLDERS])
def test_run_folder_cases(case, capsys, tmp_path, monkeypatch):
    _, make, overrides, expected = case
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    make(out)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(out))
    assert_refused(capsys, ["run", str(recipe), *overrides], out, expected, also_validate=False)


def test_overwrite_refuses_the_current_directory(capsys, tmp_path, monkeypatch):
    run = tmp_path / "project"
    _fake_run(run)
    (run / "my_code.py").write_text("print('mine')\n")
    monkeypatch.chdir(run)
    recipe = write_recipe(tmp_path / "recipe.yaml", base_recipe(Path(".")))
    assert_refused(capsys, ["run", str(recipe), "overwrite=true", "output_dir=."], run, "current directory",
                   also_validate=False)


def test_overwrite_refuses_the_run_whose_own_recipe_is_rerun(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    _fake_run(out)
    recipe = write_recipe(out / "recipe.resolved.yaml", base_recipe(out))
    assert_refused(capsys, ["run", str(recipe), "overwrite=true"], out, "lies inside output_dir", also_validate=False)


# ------------------------------------------------------------------------------------------------ property-based

_VALUES = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), max_size=2),
)
_KEYS = [
    "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.learning_rate",
    "train.max_steps", "train.logging_steps", "train.seed", "train.warmup_steps", "train.weight_decay",
    "data.max_length", "data.max_samples", "data.eval_size", "data.format", "data.text_field",
    "model.dtype", "model.pad_to_multiple_of", "model.attn_implementation", "model.trust_remote_code",
    "adapter.r", "adapter.alpha", "adapter.dropout", "overwrite", "hub.repo_id", "plugins.zloss.weight",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_KEYS), value=_VALUES)
def test_validate_never_raises_on_random_values(key, value, capsys, tmp_path_factory):
    """Any value for any key: ``validate`` accepts it (exit 0) or refuses it with one message (exit 2), never a
    traceback, and nothing is written."""
    tmp = tmp_path_factory.mktemp("prop")
    recipe = base_recipe(tmp / "out", adapter={"r": 4})
    node = recipe
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else node[part]
    node[last] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), (key, value, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error: ") and sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert not (tmp / "out").exists()


def test_the_corpus_has_at_least_150_cases():
    total = len(CASES) + len(RECIPE_TEXTS) + 1 + len(RUN_FOLDERS) + 2
    assert total >= 150, total
