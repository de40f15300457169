"""Wall-clock budgets: generation and training stop at their deadlines, and the next call resumes.

Clocks are faked per module, so "the deadline passes after the fifth response" is exact.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from tiny_training import SPEC, TRAIN, tiny_prompts

from dflash_batch.decoder.train import DataConfig, _data, _loop, generate_responses, train_drafter


class Clock:
    """The ``time`` module, except that ``time()`` reads ``now``, which the test moves."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_generation_stops_at_its_deadline_and_the_next_call_decodes_only_the_rest(tiny32, tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(_data, "time", clock)
    prompts = tiny_prompts(12, seed=5)

    def tick(done, total, tps):
        clock.now = done  # one second per response

    part = generate_responses(tiny32, prompts, tmp_path / "r.jsonl", max_new_tokens=8, batch_size=4, deadline=5.0,
                              progress=tick)
    assert 5 <= len(part) < len(prompts)  # a batch's responses finish together; nothing after the deadline
    ids = [p[0] for p in prompts]
    assert [s.id for s in part] == [i for i in ids if i in {s.id for s in part}]  # prompt order
    seen = []
    rest = generate_responses(tiny32, prompts, tmp_path / "r.jsonl", max_new_tokens=8, batch_size=4,
                              progress=lambda d, n, t: seen.append(d))
    assert [s.id for s in rest] == ids
    assert len(seen) == len(prompts) - len(part)  # only the missing prompts were decoded
    whole = generate_responses(tiny32, prompts, tmp_path / "w.jsonl", max_new_tokens=8, batch_size=4)
    assert [s.response_ids.tolist() for s in rest] == [s.response_ids.tolist() for s in whole]


@pytest.mark.slow
def test_budgeted_run_freezes_its_prompt_set_and_resumes_to_the_end(tiny32, tmp_path, monkeypatch):
    gen_clock, train_clock = Clock(), Clock()
    monkeypatch.setattr(_data, "time", gen_clock)
    monkeypatch.setattr(_loop, "time", train_clock)
    prompts = tiny_prompts(40, seed=6)
    tcfg = dataclasses.replace(TRAIN, steps=6, eval_every=0, checkpoint_every=100, log_every=1)
    data = DataConfig(max_new_tokens=8, gen_batch=8, eval_prompts=4, eval_max_new_tokens=8, online=True)
    kw = dict(spec=SPEC, tcfg=tcfg, data=data, progress=False, log=lambda _: None)

    def gen_tick(done, total, tps):
        gen_clock.now = done

    steps_seen = []
    real_step = _loop.Trainer.step

    def counted_step(self, *a):
        steps_seen.append(1)
        train_clock.now = len(steps_seen)  # one second per step
        return real_step(self, *a)

    monkeypatch.setattr(_loop.Trainer, "step", counted_step)
    from dflash_batch.decoder.train import _prepare

    real_gen = _prepare.generate_responses
    monkeypatch.setattr(_prepare, "generate_responses", lambda *a, **k: real_gen(*a, **dict(k, progress=gen_tick)))
    first = train_drafter(tiny32, prompts, tmp_path / "out", work_dir=tmp_path / "work", gen_deadline=20.0,
                          deadline=3.0, **kw)
    frozen = json.loads((tmp_path / "work" / "prompt-set.json").read_text())
    n = len(frozen["ids"])
    assert 20 <= n < 40 and frozen["of"] == 40
    assert first["prompts"]["train"] + first["prompts"]["heldout"] == n
    assert first["step"] == 3 and not first["finished"] and first["online"]
    assert (tmp_path / "out" / "model.safetensors").exists()  # the drafter so far is exported
    lines = (tmp_path / "work" / "responses.jsonl").read_text().splitlines()

    gen_clock.now = train_clock.now = 0.0
    second = train_drafter(tiny32, prompts, tmp_path / "out", work_dir=tmp_path / "work", resume=True, **kw)
    assert second["step"] == 6 and second["finished"]
    assert second["prompts"] == first["prompts"]  # the same frozen prompt set
    assert (tmp_path / "work" / "responses.jsonl").read_text().splitlines() == lines  # nothing decoded again
    assert len(steps_seen) == 6  # 3 + the 3 that were left
    with pytest.raises(FileExistsError):
        train_drafter(tiny32, prompts, tmp_path / "out", work_dir=tmp_path / "work", **kw)  # no silent overwrite


@pytest.mark.slow
def test_test_evaluation_resumes_with_the_runs_it_has_not_finished(tiny32, tiny_run, tmp_path, monkeypatch):
    from dflash_batch.decoder import train as train_pkg
    from dflash_batch.jobs import _train_cli

    _, out, _ = tiny_run
    monkeypatch.setattr(_train_cli, "read_prompts", lambda *a, **k: (tiny_prompts(3, seed=9), []))
    calls = []
    real = train_pkg.decode_tau

    def flaky(*a, **k):
        calls.append(k["mode"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the call is killed during its second run
        return real(*a, **k)

    monkeypatch.setattr(train_pkg, "decode_tau", flaky)
    record = tmp_path / "test-eval.json"
    with pytest.raises(KeyboardInterrupt):
        _train_cli.evaluate_test(tiny32, out, tmp_path / "p.parquet", 0, 8, record=record)
    assert calls == ["dflash", "ngram"]
    res = _train_cli.evaluate_test(tiny32, out, tmp_path / "p.parquet", 0, 8, record=record)
    assert calls == ["dflash", "ngram", "ngram"]  # the finished dflash run was not measured again
    assert set(res) >= {"dflash_b8", "ngram_b16"} and res["dflash_b8"]["tau"] >= 1.0
