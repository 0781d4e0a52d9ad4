"""``precision: auto``: bf16 only where the hardware has bf16 matrix units."""

from __future__ import annotations

import json

import torch

from imram.config import load_config
from imram.precision import autocast, cpu_flags, fast_bf16, resolve_precision

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"


def test_cpu_flags_read_the_first_processor_of_a_cpuinfo_file(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(X86 + "\nprocessor\t: 1\nflags\t\t: fpu amx_bf16\n")
    assert cpu_flags(str(x86)) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(arm)) == {"fp", "asimd", "bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bf16_needs_matrix_units_not_just_bf16_dot_instructions():
    assert not fast_bf16("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert fast_bf16("cpu", frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert not fast_bf16("meta", frozenset({"amx_bf16"}))


def test_auto_resolves_per_machine_and_other_values_pass_through():
    expected = "bf16" if "amx_bf16" in cpu_flags() else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(precision, "cpu") == precision
    with autocast("auto", "cpu"):
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_training_with_auto_logs_what_it_resolved_to(toy_data, tmp_path):
    from imram.training.trainer import train

    sets = ["model.embed_dim=32", "model.word_dim=16", "model.img_dim=32", "train.epochs=1"]
    config = load_config("vsepp", [*sets, "data.vocab_threshold=1", "precision=auto"])
    train(config, toy_data, tmp_path / "run", progress=False)
    assert load_config(str(tmp_path / "run" / "config.yaml")).precision == "auto"
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [(e["configured"], e["resolved"]) for e in events if e["event"] == "precision"]
    assert logged == [("auto", resolve_precision("auto", "cpu"))]
