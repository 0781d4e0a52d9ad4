"""The benchmark harness runs end to end at a small size and its two scorers agree."""

import pytest

from imram.bench import bench_scoring, format_scoring

pytestmark = pytest.mark.slow


def test_bench_scoring_runs_both_scorers_and_they_agree():
    results = bench_scoring(
        (("imram_full", 2),),
        n_images=6,
        n_captions=5,
        baseline_captions=3,
        dim=32,
        threads=1,
        repeats=1,
    )
    (r,) = results
    assert (r.name, r.steps) == ("imram_full", 2)
    assert r.engine_pairs_s > 0 and r.baseline_pairs_s > 0
    assert r.max_abs_diff < 1e-5
    table = format_scoring(results, 6, 5)
    assert "imram_full" in table.splitlines()[-1] and "x" in table.splitlines()[-1]


def test_bench_training_times_every_step_kind_and_vsepp():
    from imram.bench import TrainingShape, bench_training, format_training

    shape = TrainingShape(
        batch=4, steps_k=2, regions=5, dim=16, min_length=10, max_length=12, img_dim=24
    )
    results = bench_training(
        ("imram_text", "vsepp"), ("fp32",), shape, steps=1, repeats=1, threads=1
    )
    text, vsepp = results
    assert text.engine_steps_s > 0 and text.mined_steps_s > 0 and text.baseline_steps_s > 0
    assert text.mined_peak_mb > 0 and text.best_steps_s >= text.mined_steps_s
    # 4 candidates in a batch of 4 (3 negatives each): every pair, so every hardest negative
    assert text.shortlist_steps_s > 0 and text.shortlist_recall == 1.0
    assert vsepp.mined_steps_s is None and vsepp.baseline_steps_s is None  # one kind of step
    lines = format_training(results, shape).splitlines()
    assert "batch 4, K=2, 5 regions x 24, d=16, caption lengths 10-12" in lines[0]
    assert lines[2].startswith("imram_text") and lines[3].startswith("vsepp")
    assert lines[2].split()[-2] == "100.0%"
    ratio = text.best_steps_s / vsepp.best_steps_s
    short = text.shortlist_steps_s / vsepp.best_steps_s
    assert lines[-1] == (
        f"fp32: imram_text samples/s / VSE++ samples/s = {ratio:.3f}"
        f" (shortlist mining, m=4: {short:.3f})"
    )


def test_bench_training_checkpointed_column():
    from imram.bench import TrainingShape, bench_training, format_training

    shape = TrainingShape(batch=4, steps_k=2, regions=5, dim=16)
    results = bench_training(
        ("imram_full",), ("fp32",), shape, 1, repeats=1, threads=1, checkpointed=True
    )
    (r,) = results
    assert r.checkpointed_steps_s > 0 and r.checkpointed_peak_mb is not None
    header, row = format_training(results, shape).splitlines()[1:]
    assert header.endswith("ckpt st/s  ckpt MB") and len(row.split()) == 15  # two more columns


def test_bench_low_precision_scoring_against_the_fp32_engine():
    from imram.bench import bench_low_precision_scoring, format_low_precision

    results = bench_low_precision_scoring(
        (("imram_full", 2),), "bf16", n_images=6, n_captions=5, dim=32, threads=1, repeats=1
    )
    (r,) = results
    assert r.low_pairs_s > 0 and r.fp32_pairs_s > 0
    assert 0 < r.max_abs_diff < 0.05  # bf16 rounding: different, but close
    assert format_low_precision(results, 6, 5).splitlines()[-1].split()[:3] == [
        "imram_full",
        "2",
        "bf16",
    ]


def test_low_precision_rsum_line(toy_data, tmp_path):
    from imram.bench import low_precision_rsum
    from imram.config import load_config
    from imram.training.trainer import train

    overrides = ["model.embed_dim=16", "model.word_dim=8", "model.img_dim=32"]
    overrides += ["train.epochs=1", "train.batch_size=32", "data.vocab_threshold=1"]
    train(load_config("scan_t2i", overrides), toy_data, tmp_path / "run", progress=False)
    line = low_precision_rsum(tmp_path / "run", toy_data, "test", "bf16")
    assert line.startswith("scan_t2i on toy_precomp/test: rsum bf16 ")
    assert "fp32" in line and "difference" in line


def test_bench_two_stage_synthetic_times_the_pair_path_beside_the_engine():
    from imram.bench import bench_two_stage_synthetic

    table = bench_two_stage_synthetic(
        n_images=40, n_captions=200, ks=(2, 3, 8), timed=(16, 80, 3), dim=16, regions=4, threads=1
    )
    lines = table.splitlines()
    assert "engine on a 16 x 16 block" in lines[0]
    rows = [line.split() for line in lines[2:5]]
    assert [int(r[0]) for r in rows] == [2, 3, 8]
    # the union of both shortlists: at least k per caption, at most k per image and per caption
    for r in rows:
        k, pairs = int(r[0]), int(r[2].replace(",", ""))
        assert k * 200 <= pairs <= k * (40 + 200)
    assert rows[1][3] == rows[2][3]  # k above the largest timed one takes its rate
    assert float(rows[0][4].rstrip("x")) > 0
    assert "k above 3: the k=3 rate" in lines[-1]


def test_bench_two_stage_synthetic_restores_the_thread_count():
    import torch

    from imram.bench import bench_two_stage_synthetic

    before = torch.get_num_threads()
    bench_two_stage_synthetic(
        n_images=20, n_captions=100, ks=(2,), timed=(8, 40, 2), dim=16, regions=4, threads=1
    )
    assert torch.get_num_threads() == before


def test_bench_time_to_accuracy_trains_each_preset_and_keeps_finished_runs(
    toy_data, tmp_path, capsys
):
    from imram.cli import main
    from imram.training.curves import read_curve

    small = ["model.img_dim=32", "model.embed_dim=32", "train.epochs=2", "data.vocab_glove_top=500"]
    argv = ["bench", "training", "--time-to-accuracy", str(toy_data), "--out", str(tmp_path)]
    argv += ["--presets", "cpu_full_imram", "cpu_vsepp", "--no-progress"]
    argv += [arg for item in small for arg in ("--set", item)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    vsepp = read_curve(tmp_path / "cpu_vsepp")
    best = max(c["val_rsum"] for c in vsepp)
    assert f"reach cpu_vsepp's best dev rsum ({best:.1f})" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| cpu_")]
    assert [row.split(" | ")[0] for row in rows] == ["| cpu_full_imram", "| cpu_vsepp"]
    assert [len(read_curve(tmp_path / p)) for p in ("cpu_full_imram", "cpu_vsepp")] == [2, 2]
    assert main(argv) == 0  # finished runs are kept: the same curves, the same table
    assert capsys.readouterr().out == printed


def test_bench_extract_times_every_variant_on_generated_pictures(tmp_path):
    from imram.bench.extract import VARIANTS, bench_extract, format_extract, generated_pictures

    pictures = generated_pictures(tmp_path, 4)
    assert len({p.read_bytes() for p in pictures}) == 4  # distinct real PNG files
    results = bench_extract(sizes=(224,), pictures=pictures, batch=2, threads=1)
    assert [(r.tuned, r.extractor) for r in results] == list(VARIANTS)
    assert [r.label for r in results] == [
        "extract_features, glibc defaults",
        "plain loop, glibc defaults",
        "extract_features, tuned allocator",
        "plain loop, tuned allocator",
    ]
    assert all(r.pictures_s > 0 and r.user_s > 0 and r.system_s >= 0 for r in results)
    table = format_extract(results, 4)
    assert "224 px extract_features: tuned / defaults = " in table
    assert "224 px plain loop: tuned / defaults = " in table
