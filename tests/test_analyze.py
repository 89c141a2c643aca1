"""m2rec-analyze: the activity spectrum finds the synthetic data's planted cycles, and the pictures a run folder and a
model folder allow are written (one tiny finished run, as in test_run_folder.py)."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from m2rec import M2RecConfig, M2RecForSequentialRecommendation
from m2rec.training.analyze import (activity_spectrum, context_gate_values, main, spectrum_peaks,
                                    write_analysis_pictures)
from m2rec.training.data import DataArguments, prepare_dataset
from m2rec.training.evaluate import save_model_folder

from test_train import run_cli, small_args

MODEL_PICTURES = ["filter_response.png", "gate.png"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    run_cli("m2rec.training.train", small_args(root, "run", epochs=2), root)
    return root / "run"


def names(paths):
    return [path.name for path in paths]


def test_spectrum_peaks_at_the_planted_daily_and_weekly_cycles():
    data = prepare_dataset(DataArguments(format="synthetic", synthetic_users=300, synthetic_items=120,
                                                 cache_dir=None))
    spectrum = activity_spectrum(data.sequences, data.timestamps)
    assert spectrum.bin_seconds == 3600 and spectrum.num_users == spectrum.num_recurrence_users == 300
    weekly, daily = (int(np.argmin(abs(spectrum.frequencies - f))) for f in (1 / 7, 1.0))
    assert spectrum.frequencies[weekly] == pytest.approx(1 / 7) and spectrum.frequencies[daily] == pytest.approx(1.0)

    # Users come back to the same items every day and every week.
    assert spectrum_peaks(spectrum.frequencies, spectrum.recurrence_power, 1.5) == pytest.approx([1.0, 1 / 7])
    band = (spectrum.frequencies > 0.05) & (spectrum.frequencies <= 1.5)
    floor = np.median(spectrum.recurrence_power[band])
    assert spectrum.recurrence_power[weekly] > 1.3 * floor and spectrum.recurrence_power[daily] > 2 * floor
    # Three events a day, every day: the counts have the daily cycle only.
    assert spectrum_peaks(spectrum.frequencies, spectrum.count_power, 1.5) == pytest.approx([1.0])
    assert spectrum.count_power[weekly] < 2 * np.median(spectrum.count_power[band])


def test_spectrum_of_day_stamped_data_without_repeats():
    # Whole-day times, every item once: daily bins (no daily cycle can be seen) and nothing recurs.
    sequences = [[1, 2, 3, 4], [5, 6, 7]]
    timestamps = [[0, 86_400, 3 * 86_400, 4 * 86_400], [86_400, 2 * 86_400, 5 * 86_400]]
    spectrum = activity_spectrum(sequences, timestamps)
    assert spectrum.bin_seconds == 86_400 and spectrum.frequencies[-1] == pytest.approx(0.5)
    assert spectrum.num_users == 2 and spectrum.num_recurrence_users == 0
    assert not spectrum.recurrence_power.any()
    assert spectrum.count_power.sum() == pytest.approx(1.0)  # each user's spectrum is normalised, then averaged


def test_a_run_folder_gives_every_picture(finished_run, tmp_path):
    pictures = write_analysis_pictures(finished_run, tmp_path / "pictures")
    assert names(pictures) == ["activity_spectrum.png", *MODEL_PICTURES, "training_curves.png"]
    for picture in pictures:
        assert picture.parent == tmp_path / "pictures" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_folder_gives_the_model_pictures_only(finished_run, tmp_path, caplog):
    pictures = write_analysis_pictures(finished_run / "best", tmp_path)
    assert names(pictures) == MODEL_PICTURES
    assert "no activity spectrum and no training curves" in caplog.text


def model_folder(path, **config):
    model = M2RecForSequentialRecommendation(M2RecConfig(num_items=5, max_len=8, hidden_size=8, **config))
    save_model_folder(model, {str(i): i for i in range(1, 6)}, path)
    return path


def test_models_without_a_filter_or_a_gate_skip_their_pictures(tmp_path, caplog):
    assert write_analysis_pictures(model_folder(tmp_path / "none", fft_mode="none", fusion="sum"), tmp_path) == []
    assert "fft_mode='none'" in caplog.text and "fusion='sum' has no learned gate" in caplog.text
    fixed = write_analysis_pictures(model_folder(tmp_path / "fixed", fft_adaptive=False, fusion="none"), tmp_path)
    assert names(fixed) == ["filter_response.png"]


def test_the_context_gate_is_drawn_over_validation_inputs(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    trained = json.loads((run / "best" / "config.json").read_text())
    model = M2RecForSequentialRecommendation(M2RecConfig(num_items=trained["num_items"], max_len=trained["max_len"],
                                                         fusion="context_gate"))
    item_id_map = json.loads((run / "best" / "item_id_map.json").read_text())
    save_model_folder(model, item_id_map, run / "best")
    assert "gate.png" in names(write_analysis_pictures(run, tmp_path / "pictures"))

    gate = context_gate_values(model.eval(), [[1, 2, 3], [4]])
    assert gate.shape == (4 * model.config.hidden_size,)  # real positions × channels, padding left out
    assert ((gate > 0) & (gate < 1)).all()


def test_missing_matplotlib_is_a_clear_error(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(ImportError, match=r'pip install "m2rec\[plots\]"'):
        write_analysis_pictures(finished_run, tmp_path)
    with pytest.raises(SystemExit, match=r"m2rec-analyze: .*matplotlib, which is not installed"):
        main([str(finished_run), "--output", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written
