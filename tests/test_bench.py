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
