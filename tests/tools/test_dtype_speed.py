"""The dtype measurement (tools/dtype_speed.py) times a decode step in both dtypes, per batch of rows."""


def test_measure_gives_one_row_per_batch_with_both_dtypes(tiny_llama_dir):
    import dtype_speed

    result = dtype_speed.measure(str(tiny_llama_dir), rows=[1, 2], repeats=3, context=8)
    assert [r["rows"] for r in result] == [1, 2]
    for r in result:
        # The tiny model's step takes well under a millisecond: the rounded ms may read 0.0, the
        # ratio (taken before rounding) may not.
        assert r["float32_ms"] >= 0 and r["bfloat16_ms"] >= 0 and r["float32_over_bfloat16"] > 0
