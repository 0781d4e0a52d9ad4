"""The benchmark harness runs end to end at a small size and its two scorers agree."""

from imram.bench import bench_scoring, format_scoring


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


def test_bench_training_times_both_training_steps():
    from imram.bench import bench_training, format_training

    results = bench_training(
        ("imram_text",),
        ("fp32",),
        steps_k=2,
        batch=4,
        regions=5,
        dim=16,
        steps=1,
        repeats=1,
        threads=1,
    )
    (r,) = results
    assert r.engine_steps_s > 0 and r.baseline_steps_s > 0
    assert (
        format_training(results, 4, 2, regions=5, dim=16).splitlines()[-1].startswith("imram_text")
    )


def test_bench_training_checkpointed_column():
    from imram.bench import bench_training, format_training

    results = bench_training(
        ("imram_full",), ("fp32",), 2, 4, 5, 16, 1, repeats=1, threads=1, checkpointed=True
    )
    (r,) = results
    assert r.checkpointed_steps_s > 0 and r.checkpointed_peak_mb is not None
    header, row = format_training(results, 4, 2, 5, 16).splitlines()[1:]
    assert header.endswith("ckpt st/s  ckpt MB") and len(row.split()) == 9  # two more columns


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
