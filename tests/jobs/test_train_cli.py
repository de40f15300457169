"""``train-drafter``'s prompt reading and its registration on the CLI."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from dflash_batch.jobs._train_cli import read_prompts
from dflash_batch.jobs.cli import main


class ByteTokenizer:
    """Token id = byte value; the chat template just prefixes the role."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"{m['role']}:{m['content']}|" for m in messages) + ("assistant:" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}


def test_reads_valid_rows_and_reports_bad_ones(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "document": "Doc one."}, {"id": "b", "document": ""},
                                         {"id": "a", "document": "dup"}, {"id": "c", "document": "Doc three."}]), path)
    prompts, bad = read_prompts(path, ByteTokenizer())  # auto: a document column means template summarize
    assert [p[0] for p in prompts] == ["a", "c"]
    assert bytes(prompts[0][1]).decode().startswith("user:Summarize the following text")
    assert len(bad) == 2 and "empty" in bad[0] and "duplicate" in bad[1]


def test_plain_prompts_are_tokenized_as_given_and_limit_applies(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": str(i), "prompt": f"hi {i}"} for i in range(5)]), path)
    prompts, bad = read_prompts(path, ByteTokenizer(), limit=2)
    assert prompts == [("0", list(b"hi 0")), ("1", list(b"hi 1"))] and not bad


def test_command_is_registered():
    result = CliRunner().invoke(main, ["train-drafter", "--help"])
    assert result.exit_code == 0
    assert "--resume" in result.output and "--draft-vocab" in result.output


def test_messages_prompts_are_read_without_the_pipeline_so_accelerator_hosts_need_no_beam(tmp_path):
    """Accelerator hosts have no Apache Beam: train-drafter must start, and read the prepared
    (messages) prompts, with Beam unimportable."""
    import subprocess
    import sys

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "messages": [{"role": "user", "content": "hi"}]}]), path)
    code = f"""
import sys
sys.modules["apache_beam"] = None  # any import of it now fails

class Tok:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["role"] + ":" + m["content"] + "|" for m in messages) + "assistant:"

    def __call__(self, text, add_special_tokens=False):
        return {{"input_ids": list(text.encode())}}

from dflash_batch.jobs._train_cli import read_prompts, train_drafter_command
prompts, bad = read_prompts({str(path)!r}, Tok())
assert prompts == [("a", list(b"user:hi|assistant:"))] and not bad, (prompts, bad)
train_drafter_command(["--help"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--online / --offline" in r.stdout and "--time-budget" in r.stdout


def test_budgets_become_deadlines():
    from dflash_batch.jobs._train_cli import deadlines

    assert deadlines(100.0, 0.0, None, None) == (None, None)  # no budget: no limit
    assert deadlines(100.0, 1000.0, None, None) == (500.0, 900.0)  # 40% generation, 20% kept for evaluation
    assert deadlines(100.0, 1000.0, 50.0, 300.0) == (150.0, 800.0)
    assert deadlines(100.0, 0.0, 60.0, None) == (160.0, None)  # generation by the hour, training to its end


def test_dtype_is_an_option_resolved_like_a_jobs(tiny_llama_dir):
    from click.testing import CliRunner

    from dflash_batch.decoder._dtype import CPU_AUTO
    from dflash_batch.jobs._train_cli import target_dtype, train_drafter_command

    assert target_dtype("auto", str(tiny_llama_dir)) == CPU_AUTO  # this machine is a CPU
    assert target_dtype("bfloat16", str(tiny_llama_dir)) == "bfloat16"
    bad = CliRunner().invoke(train_drafter_command, ["--dtype", "fp8", "--prompts", __file__, "--out", "x"])
    assert bad.exit_code == 2 and "--dtype" in bad.output and "fp8" in bad.output


def _parse(args: list[str]) -> tuple:
    """(DrafterSpec, TrainConfig, DataConfig) as the command builds them from ``args``."""
    from dflash_batch.jobs._settings_options import settings_from
    from dflash_batch.jobs._train_cli import SETTINGS, train_drafter_command

    ctx = train_drafter_command.make_context("train-drafter", ["--prompts", __file__, "--out", "x", *args])
    return tuple(settings_from(cls, ctx.params) for cls in SETTINGS)


def test_every_settings_field_is_an_option_with_the_fields_default_and_help():
    """One default per setting: the dataclass's. A hand-written option, or one that is missing,
    fails here."""
    import dataclasses

    from dflash_batch.jobs._settings_options import option_name
    from dflash_batch.jobs._train_cli import SETTINGS, train_drafter_command

    params = {p.name: p for p in train_drafter_command.params}
    for cls in SETTINGS:
        for field in dataclasses.fields(cls):
            assert field.name in params, f"{cls.__name__}.{field.name} has no option"
            option = params[field.name]
            assert option_name(field).split("/")[0] in option.opts
            assert option.help == field.metadata["help"] and option.help
    assert _parse([]) == tuple(cls() for cls in SETTINGS)  # every parsed default is the field's


def test_the_recipes_option_names_still_set_their_fields():
    spec, tcfg, data = _parse(["--layers", "2", "--batch", "8", "--draft-vocab", "0", "--init", "random",
                               "--init-from", "default", "--target-layers", "1,3", "--source-layers", "4",
                               "--no-standardize", "--eval-every", "0", "--steps", "9", "--teacher", "full",
                               "--offline", "--gen-mode", "ngram", "--eval-prompts", "3", "--clip", "0.5"])
    assert (spec.num_layers, spec.draft_vocab_size, spec.init_from_target, spec.init_drafter) == (2, None, False, "default")
    assert (spec.target_layer_ids, spec.source_layers, spec.standardize) == ((1, 3), (4,), False)
    assert (tcfg.batch_size, tcfg.eval_every, tcfg.steps, tcfg.teacher, tcfg.clip) == (8, 0, 9, "full", 0.5)
    assert (data.online, data.gen_mode, data.eval_prompts) == (False, "ngram", 3)


def test_an_option_outside_its_fields_bounds_is_refused_by_name():
    from dflash_batch.jobs._train_cli import train_drafter_command

    for args, name in ((["--steps", "0"], "--steps"), (["--warmup", "1"], "--warmup"),
                       (["--teacher", "soft"], "--teacher"), (["--target-layers", "1,a"], "--target-layers")):
        bad = CliRunner().invoke(train_drafter_command, ["--prompts", __file__, "--out", "x", *args])
        assert bad.exit_code == 2 and name in bad.output, (args, bad.output)
