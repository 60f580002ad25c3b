"""bench/kernels.py: every weight format computes the same product, and the table prints a row each."""
import torch

from bench.kernels import formats, int8_rows, main


def test_every_format_computes_x_times_w_transposed_within_its_precision():
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), torch.randn(1, 64)
    reference = x @ w.t()
    tolerance = {"fp32": 1e-5, "bf16": 2e-2, "int8 (fused dequant)": 2e-2, "int8 (ATen _weight_int8pack_mm)": 2e-2,
                 "int8 (smelt AVX2 kernel)": 2e-2, "int8 (smelt AVX-512 kernel)": 2e-2}
    for name, (fn, wq, sc) in formats(w).items():
        err = ((fn(x, wq, sc) - reference).abs().max() / reference.abs().max()).item()
        assert err < tolerance[name], (name, err)


def test_int8_rows_round_trip_within_half_a_step():
    w = torch.randn(8, 16)
    w8, s = int8_rows(w)
    assert w8.dtype == torch.int8 and w8.abs().max() <= 127
    assert ((w8.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_the_table_has_a_row_per_format_with_a_small_error(capsys):
    main(["--n", "32", "--k", "64", "--repeats", "2", "--passes", "1"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r[:34].strip() for r in rows] == list(formats(torch.zeros(1, 1)))
    assert all(float(r.split()[-1]) < 2e-2 for r in rows)
