import json

import matplotlib.image
import pytest

from jaxsparse.plot import plot_metrics, read_metrics


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_classification_plot_is_a_png(tmp_path):
    m = tmp_path / "metrics.jsonl"
    _write(
        m,
        [{"split": "train", "step": s, "loss": 1 / s} for s in range(1, 6)]
        + [{"split": "eval", "step": 5, "loss": 0.3, "accuracy": 0.8, "macro_f1": 0.79}],
    )
    out = plot_metrics(m)
    img = matplotlib.image.imread(out)
    assert out == str(tmp_path / "metrics.png") and img.shape[0] > 100 and img.shape[1] > 500  # two panels
    assert not list(tmp_path.glob(".*tmp*"))


def test_perplexity_plot_and_resumed_duplicates(tmp_path):
    m = tmp_path / "metrics.jsonl"
    _write(
        m,
        [
            {"split": "eval", "step": 0, "loss": 3.0, "perplexity": 20.0},
            {"split": "train", "step": 2, "loss": 2.9},
            {"split": "train", "step": 2, "loss": 2.8},
            {"split": "eval", "step": 2, "loss": 2.5, "perplexity": 12.2},
        ],
    )
    assert plot_metrics(m, tmp_path / "p.png").endswith("p.png")


def test_bad_line_is_named(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"split": "train", "step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(m)
