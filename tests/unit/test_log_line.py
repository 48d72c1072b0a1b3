"""The log line: Megatron's fields by default, the rest with logging.verbose=true."""

from megatron_paci.training.metrics import format_log_line

ROW = {"iteration": 30, "consumed_samples": 480, "ms_per_iter": 325.04, "tokens_per_s": 6301.6,
       "tflops": 0.0329, "lr": 1.5e-3, "global_batch_size": 16, "loss": 5.871302,
       "grad_norm": 0.9474, "skipped_iters": 2, "comm_bytes_tp": 3 * 2**20,
       "comm_bytes_dp": 2**19, "comm_bytes_pp": 0}


def test_default_line_holds_megatrons_fields_only():
    line = format_log_line(ROW, 600)
    assert line == (" iteration       30/     600 | consumed samples:          480 | "
                    "elapsed time per iteration (ms): 325.0 | learning rate: 1.500E-03 | "
                    "lm loss: 5.871302E+00 | grad norm: 0.947 | "
                    "number of skipped iterations:   2 | tokens/s: 6302 |")


def test_verbose_line_adds_throughput_batch_and_bytes():
    line = format_log_line(ROW, 600, verbose=True)
    for part in ("| TFLOP/s/GPU: 0.033 |", "| global batch size:    16 |",
                 "| learning rate: 1.500000E-03 |", "| sent MB/iter tp: 3.00 dp: 0.50 pp: 0.00 |"):
        assert part in line, part
    assert "bubble" not in line  # no pipeline, no bubble
    piped = format_log_line({**ROW, "bubble_fraction": 0.4341}, 600, verbose=True)
    assert "| bubble: 0.434 |" in piped
    assert "bubble" not in format_log_line({**ROW, "bubble_fraction": 0.4341}, 600)


def test_eta_peak_memory_and_per_gpu_throughput_are_shown():
    from megatron_paci.training.metrics import format_log_line

    row = {"iteration": 10, "consumed_samples": 160, "ms_per_iter": 250.0, "lr": 1e-3,
           "loss": 5.0, "grad_norm": 1.0, "skipped_iters": 0, "tokens_per_s": 8000.0,
           "tflops": 0.5, "global_batch_size": 16, "tokens_per_s_per_gpu": 2000.0,
           "peak_mem_mb": 1234.4, "eta_s": 3 * 3600 + 25 * 60 + 7}
    assert "ETA: 3:25:07" in format_log_line(row, 100)
    verbose = format_log_line(row, 100, verbose=True)
    assert "tokens/s/GPU: 2000" in verbose and "peak memory (MB): 1234" in verbose
