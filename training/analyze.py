"""m2rec-analyze: pictures of what a run's data holds and what its model learned (issue #16), as PNG files.

    m2rec-analyze RUN_OR_MODEL_DIR [--output DIR]     (default DIR: RUN_OR_MODEL_DIR/pictures)

From a run folder (metrics.jsonl, best/ with the model and training_info.json):
    activity_spectrum.png   the data's periodicities in time, the analogue of the paper's Fig. 1 (`activity_spectrum`)
    filter_response.png     the learned FFT filter |W ⊙ M| per frequency bin, mean and spread over channels
    gate.png                the fusion gate: α and β (fusion="gate"), or the context gate's values over validation
                            inputs (fusion="context_gate")
    training_curves.png     train loss and validation NDCG@10 per epoch, from metrics.jsonl
From a model folder alone only the model's pictures (filter and gate, without the context gate's values, which need
data); every picture that cannot be drawn is logged with the reason. `write_analysis_pictures` is the same as a
function, for the model card.

matplotlib is an optional extra (`pip install "m2rec[plots]"`), imported only when pictures are drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import PreparedDataset, prepare_dataset
from .evaluate import (examples_in_model_ids, load_trained_model, read_item_id_map, read_training_info,
                       run_data_arguments)

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
HOUR = 3_600
MAX_GATE_USERS = 512  # validation users whose context-gate values are collected: enough for a histogram


@dataclass
class ActivitySpectrum:
    """Power spectra of users' activity over time, each user's normalised to unit total power, averaged over users.

    frequencies: (K,) cycles per day, 0 up to the Nyquist frequency of `bin_seconds`;
    count_power: (K,) spectrum of the interaction counts per time bin (the paper's Fig. 1 signal);
    recurrence_power: (K,) spectrum of the per-item occurrence indicators, power summed over the items a user has
    more than once; zeros when no user repeats an item;
    num_users / num_recurrence_users: users averaged in each.
    """

    frequencies: np.ndarray
    count_power: np.ndarray
    recurrence_power: np.ndarray
    bin_seconds: int
    window_days: int
    num_users: int
    num_recurrence_users: int


def activity_spectrum(sequences: list[list[int]], timestamps: list[list[float]],
                      window_days: int = 112) -> ActivitySpectrum:
    """The data's periodicities: two spectra over the same time grid (see `ActivitySpectrum`).

    Each user's most recent `window_days` are cut into hourly bins (daily bins when every timestamp is a whole day:
    then no daily cycle can be seen), and every signal is zero-padded to the window, so all users share the
    frequency grid k / window_days cycles per day (1/7 and 1 are exact bins at the default 112 days = 16 weeks).

    Why two signals. The paper plots interaction counts; they show when users are active, but not what they do:
    a user active three times every day has a flat count signal apart from its daily rhythm, whatever the weekly
    pattern of their choices. The per-item occurrence indicators x_i(t) (1 when the user interacts with item i in
    bin t) keep that pattern: sum_i |X_i(f)|² is the Fourier transform of the number of same-item pairs at each
    time lag, so its peaks are the periods at which users come back to the same items (a weekly habit peaks at
    1/7 per day). It is defined for any data with times; where no user repeats an item (MovieLens ratings), it is
    empty. Each signal has its mean over the user's active span removed (otherwise the span's own shape
    dominates the lowest frequencies), and each user's spectrum is normalised to unit total power before
    averaging, so that every user counts once, whatever the length of their history.

    sequences[u], timestamps[u]: item ids and times (seconds) of user u, oldest first.
    """
    all_times = np.concatenate([np.asarray(t, dtype=np.float64) for t in timestamps])
    bin_seconds = SECONDS_PER_DAY if np.all(all_times % SECONDS_PER_DAY == 0) else HOUR
    num_bins = window_days * SECONDS_PER_DAY // bin_seconds  # (T,) the common, zero-padded grid
    frequencies = np.fft.rfftfreq(num_bins, d=bin_seconds / SECONDS_PER_DAY)  # (K,) cycles per day
    count_power, recurrence_power = np.zeros(len(frequencies)), np.zeros(len(frequencies))
    num_users = num_recurrence_users = 0
    for items, times in zip(sequences, timestamps):
        times, items = np.asarray(times, dtype=np.float64), np.asarray(items)
        recent = times > times[-1] - window_days * SECONDS_PER_DAY
        times, items = times[recent], items[recent]
        bins = ((times - times[0]) // bin_seconds).astype(np.int64)  # (n,) within 0..T-1
        span = int(bins[-1]) + 1
        counts = np.bincount(bins, minlength=span).astype(np.float64)  # (span,)
        user_power = _power_without_mean(counts[None], num_bins)
        if user_power is not None:
            count_power += user_power
            num_users += 1
        _, item_rows, item_counts = np.unique(items, return_inverse=True, return_counts=True)
        repeated = item_counts[item_rows] >= 2  # (n,) events of items the user has more than once
        if repeated.any():
            _, rows = np.unique(item_rows[repeated], return_inverse=True)
            indicators = np.zeros((rows.max() + 1, span))  # (repeated items, span)
            np.add.at(indicators, (rows, bins[repeated]), 1.0)
            user_power = _power_without_mean(indicators, num_bins)
            if user_power is not None:
                recurrence_power += user_power
                num_recurrence_users += 1
    return ActivitySpectrum(frequencies, count_power / max(num_users, 1),
                            recurrence_power / max(num_recurrence_users, 1), bin_seconds, window_days, num_users,
                            num_recurrence_users)


def _power_without_mean(signals: np.ndarray, num_bins: int) -> Optional[np.ndarray]:
    """(S, span) signals → their power spectra summed over S, (K,), normalised to sum 1; None for a constant
    signal (a user active in one bin only, or evenly in every bin), which has no power once its mean is gone."""
    centred = signals - signals.mean(axis=1, keepdims=True)
    power = (np.abs(np.fft.rfft(centred, n=num_bins, axis=1)) ** 2).sum(axis=0)  # (K,)
    total = power.sum()
    return power / total if total > 1e-12 else None


def spectrum_peaks(frequencies: np.ndarray, power: np.ndarray, max_frequency: float, num_peaks: int = 3,
                   min_frequency: float = 1 / 21, min_separation: float = 0.15,
                   min_relative_height: float = 0.15) -> list[float]:
    """The frequencies (cycles per day) of the `num_peaks` highest local maxima of `power` (K,) between
    `min_frequency` and `max_frequency`, highest first. Slower cycles than three weeks are not marked: a history of
    a few weeks holds too few of them to tell them from the drift of the user's activity, which fills the lowest
    bins. A peak must rise above the band's median by at least `min_relative_height` times the tallest peak's rise
    (the ripple of a noise floor is no cycle) and lie `min_separation` from a taller one: a weekly modulation of a
    daily cycle adds side peaks at 1 ± 1/7, next to the daily peak, that say nothing new."""
    band = np.flatnonzero((frequencies >= min_frequency) & (frequencies <= max_frequency))
    if len(band) < 3:
        return []
    values = power[band]
    local = np.flatnonzero((values[1:-1] > values[:-2]) & (values[1:-1] >= values[2:])) + 1  # local maxima
    if len(local) == 0:
        return []
    floor = np.median(values)
    tallest_rise = values[local].max() - floor
    peaks: list[float] = []
    for index in local[np.argsort(values[local])[::-1]]:
        frequency = float(frequencies[band[index]])
        if values[index] - floor < min_relative_height * tallest_rise or len(peaks) == num_peaks:
            break
        if all(abs(frequency - chosen) >= min_separation for chosen in peaks):
            peaks.append(frequency)
    return peaks


def filter_response(model) -> Optional[tuple[np.ndarray, int, bool]]:
    """|W ⊙ M| of the model's FFT filter: (F, D) magnitudes (F, 1 when W is not learned), the number of kept bins,
    and whether W is learned; None when the model has no filter (fft_mode="none")."""
    frequency_filter = model.m2rec.frequency_filter
    if frequency_filter is None:
        return None
    with torch.no_grad():
        magnitude = frequency_filter.masked_response(torch.device("cpu")).abs().numpy()
    return magnitude, frequency_filter.num_kept_bins, frequency_filter.frequency_response is not None


def context_gate_values(model, inputs: list[list[int]], batch_size: int = 128) -> np.ndarray:
    """The context gate g = σ(gate_proj([E_text; E_mamba])) at every real position of `inputs` (item ids), as a flat
    array of its per-dimension values (positions × D). g weighs the text, 1 − g the sequence."""
    fusion = model.m2rec.fusion
    collected = []

    def keep_gate(module, module_inputs, output):  # output: (B, L, D) pre-sigmoid gate
        collected.append(torch.sigmoid(output))

    handle = fusion.gate_proj.register_forward_hook(keep_gate)
    values = []
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                rows = [row[-model.config.max_len:] for row in inputs[start:start + batch_size]]
                length = max(len(row) for row in rows)
                input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])  # (B, L) right-padded
                collected.clear()
                model(input_ids=input_ids, attention_mask=(input_ids != 0).long())
                values.append(collected[0][input_ids != 0].flatten())  # (real positions × D,)
    finally:
        handle.remove()
    return torch.cat(values).numpy()


def read_training_curves(metrics_file: Path) -> tuple[list[int], list[float], list[float]]:
    """Epochs, train losses and validation NDCG@10 from a run's metrics.jsonl (lines without an epoch's training
    record, such as the final test summary, are skipped)."""
    epochs, losses, ndcgs = [], [], []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "train_loss" in record and "NDCG@10" in record.get("valid", {}):
            epochs.append(record["epoch"])
            losses.append(record["train_loss"])
            ndcgs.append(record["valid"]["NDCG@10"])
    return epochs, losses, ndcgs


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('m2rec-analyze draws with matplotlib, which is not installed: pip install "m2rec[plots]" '
                          '(or pip install matplotlib)') from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as pyplot
    return pyplot


def _resolve(run_or_model_dir: Path) -> tuple[Path, Optional[Path]]:
    """(model folder, run folder or None)."""
    if (run_or_model_dir / "metrics.jsonl").is_file() and (run_or_model_dir / "best" / "config.json").is_file():
        return run_or_model_dir / "best", run_or_model_dir
    if (run_or_model_dir / "config.json").is_file():
        return run_or_model_dir, None
    raise FileNotFoundError(f"{run_or_model_dir} is neither a run folder (metrics.jsonl and best/config.json) nor "
                            f"a model folder (config.json)")


def _run_data(model_dir: Path) -> PreparedDataset:
    """The run's data as it was trained on, with its times (every cache entry keeps them since PIPELINE_VERSION 3)."""
    return prepare_dataset(run_data_arguments(read_training_info(model_dir)))


def write_analysis_pictures(run_or_model_dir: str | Path, output_dir: str | Path) -> list[Path]:
    """Draw every picture the folder allows (see the module docstring) into `output_dir`; returns the files written,
    in a fixed order (spectrum, filter, gate, curves). Pictures that cannot be drawn are logged with the reason.
    Raises ImportError naming the extra when matplotlib is missing."""
    pyplot = _import_pyplot()
    model_dir, run_dir = _resolve(Path(run_or_model_dir))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_trained_model(model_dir).eval()
    model.config.kernel_backend = "torch"  # a few forwards: not worth compiling the fused CPU kernels
    data = None
    if run_dir is None:
        logger.warning("%s is a model folder: no activity spectrum and no training curves (they need a run folder, "
                       "with metrics.jsonl and the data)", model_dir)
    else:
        try:
            data = _run_data(model_dir)
        except (FileNotFoundError, ValueError) as e:  # data paths are relative to where training ran
            logger.warning("no activity spectrum and no context-gate values: the run's data cannot be read from "
                           "here (%s); run from the folder training ran in", e)

    pictures = []
    if data is not None and data.timestamps is None:
        logger.warning("no activity spectrum: the data (%s) has no timestamps", data.path or "input")
    elif data is not None:
        pictures.append(_plot_spectrum(pyplot, activity_spectrum(data.sequences, data.timestamps),
                                       output_dir / "activity_spectrum.png"))
    response = filter_response(model)
    if response is None:
        logger.warning("no filter picture: fft_mode='none', the model has no FFT filter")
    else:
        pictures.append(_plot_filter(pyplot, *response, model.config, output_dir / "filter_response.png"))
    gate_picture = _plot_gate(pyplot, model, model_dir, data, output_dir / "gate.png")
    if gate_picture is not None:
        pictures.append(gate_picture)
    if run_dir is not None:
        pictures.append(_plot_curves(pyplot, *read_training_curves(run_dir / "metrics.jsonl"),
                                     output_dir / "training_curves.png"))
    return pictures


def _save(pyplot, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def _period_label(frequency: float) -> str:
    period_days = 1 / frequency
    return f"{frequency:.3f}/day ({period_days * 24:.1f} h)" if period_days < 2 else \
        f"{frequency:.3f}/day ({period_days:.1f} days)"


def _plot_spectrum(pyplot, spectrum: ActivitySpectrum, path: Path) -> Path:
    max_frequency = min(1.5, spectrum.frequencies[-1])  # the paper's range: daily and slower cycles
    shown = (spectrum.frequencies > 0) & (spectrum.frequencies <= max_frequency)
    grain = "hourly" if spectrum.bin_seconds == HOUR else "daily (timestamps are whole days: no daily cycle visible)"
    figure, axes = pyplot.subplots(2, 1, figsize=(9, 7), sharex=True)
    panels = (
        (spectrum.count_power, spectrum.num_users,
         "interaction counts (when users are active; the paper's Fig. 1 signal)"),
        (spectrum.recurrence_power, spectrum.num_recurrence_users,
         "per-item occurrence indicators, power summed over items (when users come back to the same items)"),
    )
    for axis, (power, users, title) in zip(axes, panels):
        axis.set_title(f"{title}\n{users} users", fontsize=9)
        axis.set_ylabel("mean normalised power")
        if users == 0:
            axis.text(0.5, 0.5, "no user has an item twice: nothing recurs", ha="center", transform=axis.transAxes)
            continue
        axis.plot(spectrum.frequencies[shown], power[shown], lw=0.8, color="tab:blue")
        for frequency, colour in zip(spectrum_peaks(spectrum.frequencies, power, max_frequency),
                                     ("tab:red", "tab:green", "tab:purple")):
            axis.axvline(frequency, ls="--", color=colour, lw=1, label=_period_label(frequency))
        axis.legend(fontsize=8, loc="upper left", title="peaks", title_fontsize=8)
    axes[-1].set_xlabel("frequency (cycles per day)")
    figure.suptitle(f"Activity spectrum: FFT of each user's last {spectrum.window_days} days ({grain} bins), "
                    "averaged over users", fontsize=10)
    return _save(pyplot, figure, path)


def _plot_filter(pyplot, magnitude: np.ndarray, num_kept_bins: int, learned: bool, config, path: Path) -> Path:
    num_bins = magnitude.shape[0]
    bins = np.arange(num_bins)
    figure, axis = pyplot.subplots(figsize=(9, 4.5))
    if learned:
        low, high = np.percentile(magnitude, [10, 90], axis=1)  # (F,) spread over the D channels
        axis.fill_between(bins, low, high, alpha=0.3, color="tab:blue", label="10–90 % of channels")
        axis.plot(bins, magnitude.mean(axis=1), color="tab:blue", label="mean over channels")
        kind = f"learned response |W ⊙ M| over {magnitude.shape[1]} channels"
    else:
        axis.step(bins, magnitude[:, 0], where="mid", color="tab:blue", label="mask M")
        kind = "fixed low-pass mask M only (fft_adaptive=False: W is not learned)"
    axis.axvline(num_kept_bins - 0.5, color="tab:red", ls="--",
                 label=f"cut-off: bins ≥ {num_kept_bins} removed (fft_cut_ratio={config.fft_cut_ratio})")
    axis.set_xlabel(f"frequency bin k (k / {config.fft_size} cycles per position)")
    axis.set_ylabel("|W ⊙ M|")
    axis.set_xlim(0, num_bins - 1)

    def bins_and_periods(value):  # bin k <-> period fft_size / k items: the map is its own inverse
        return config.fft_size / np.maximum(value, 1e-9)

    period = axis.secondary_xaxis("top", functions=(bins_and_periods, bins_and_periods))
    period.set_xlabel("period (positions, i.e. items)")
    period.set_xticks([p for p in (2, 3, 5, 7, 10, 21, 50) if p <= config.fft_size])  # longer ones crowd bin 0
    axis.legend(fontsize=8)
    figure.suptitle(f"FFT filter ({config.fft_mode} mode): {kind}", fontsize=10)
    return _save(pyplot, figure, path)


def _plot_gate(pyplot, model, model_dir: Path, data: Optional[PreparedDataset], path: Path) -> Optional[Path]:
    fusion = model.config.fusion
    if fusion == "gate":
        weights = model.m2rec.fusion
        alpha, beta = weights.text_weight.item(), weights.sequence_weight.item()
        figure, axis = pyplot.subplots(figsize=(5, 4))
        axis.bar(["α (text)", "β (sequence)"], [alpha, beta], color=["tab:orange", "tab:blue"])
        axis.axhline(1.0, color="grey", ls=":", lw=1, label="initial value")
        for x, value in enumerate((alpha, beta)):
            axis.text(x, value, f"{value:.3f}", ha="center", va="bottom" if value >= 0 else "top")
        axis.legend(fontsize=8)
        axis.set_title("Gate (eq. 16): Y = Linear(α·E_text + β·E_mamba)", fontsize=10)
        return _save(pyplot, figure, path)
    if fusion != "context_gate":
        logger.warning("no gate picture: fusion=%r has no learned gate", fusion)
        return None
    if data is None:
        logger.warning("no gate picture: fusion='context_gate' varies with the input, and a model folder has no "
                       "validation inputs (pass the run folder)")
        return None
    examples, _ = examples_in_model_ids(data.leave_one_out("valid"), data,
                                        read_item_id_map(model_dir, model.config.num_items))
    inputs = [examples.history(k).tolist() for k in range(min(len(examples), MAX_GATE_USERS))]
    values = context_gate_values(model, inputs)
    figure, axis = pyplot.subplots(figsize=(7, 4))
    axis.hist(values, bins=50, range=(0, 1), color="tab:orange")
    axis.axvline(values.mean(), color="black", ls="--", label=f"mean g = {values.mean():.3f}")
    axis.set_xlabel("g (weight of the text; 1 − g weighs the sequence)")
    axis.set_ylabel("positions × channels")
    axis.legend(fontsize=8)
    axis.set_title(f"Context gate over the validation inputs of {len(inputs)} users", fontsize=10)
    return _save(pyplot, figure, path)


def _plot_curves(pyplot, epochs: list[int], losses: list[float], ndcgs: list[float], path: Path) -> Path:
    figure, (loss_axis, ndcg_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, losses, marker=".")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss")
    ndcg_axis.plot(epochs, ndcgs, marker=".", color="tab:green")
    if ndcgs:
        best = int(np.argmax(ndcgs))
        ndcg_axis.axvline(epochs[best], color="grey", ls=":",
                          label=f"best: epoch {epochs[best]}, {ndcgs[best]:.4f}")
        ndcg_axis.legend(fontsize=8)
    ndcg_axis.set_xlabel("epoch")
    ndcg_axis.set_ylabel("validation NDCG@10")
    figure.suptitle("Training curves (metrics.jsonl)", fontsize=10)
    return _save(pyplot, figure, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="m2rec-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run folder (runs/NAME) or a model folder (runs/NAME/best)")
    parser.add_argument("--output", default=None, help="where the PNGs go (default: FOLDER/pictures)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = Path(args.output) if args.output else Path(args.folder) / "pictures"
    try:
        pictures = write_analysis_pictures(args.folder, output)
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"m2rec-analyze: {e}") from None
    for picture in pictures:
        print(picture)


if __name__ == "__main__":
    main()
