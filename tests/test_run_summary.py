"""A finished fit's summary: metrics.json and the HParams session of TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import Namespace

from lightning_sae.run_summary import HPARAMS_DIR, METRICS_FILE, flatten_config, hyperparameters, summarize_fit


def test_flatten_config_keeps_scalars_and_writes_the_rest_as_json() -> None:
    config = Namespace(model=Namespace(d_sae=64, lr=None, betas=[0.9, 0.999],
                                       encoder={"class_path": "TopK", "init_args": {"k": 4}}),
                       seed_everything=0, ckpt_path=None)
    flat = flatten_config(config)
    assert flat["model.d_sae"] == 64 and flat["model.lr"] == "null" and flat["model.betas"] == "[0.9, 0.999]"
    assert flat["model.encoder.init_args.k"] == 4
    assert set(hyperparameters(config)) == {"model.d_sae", "model.lr", "model.betas", "model.encoder.class_path",
                                           "model.encoder.init_args.k", "seed_everything"}


def test_summarize_fit_writes_metrics_json_and_an_hparams_session(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = {"model": {"d_sae": 64, "target_l0": 4.0}, "data": {"batch_size": 256}, "trainer": {"max_steps": 10}}
    metrics = {"val/fvu": 0.25, "val/l0": 4.0, "val/mmcs": float("nan")}
    path = summarize_fit(tmp_path, config, metrics, step=10, train_rows=2560, tensorboard=True)
    assert path == tmp_path / METRICS_FILE
    written = json.loads(path.read_text())
    assert written["step"] == 10 and written["train_rows"] == 2560
    assert written["metrics"]["val/fvu"] == 0.25 and written["hparams"]["model.d_sae"] == 64
    events = EventAccumulator(str(tmp_path / HPARAMS_DIR)).Reload()
    assert events.Scalars("final/val/fvu")[-1].value == 0.25 and events.Scalars("final/val/fvu")[-1].step == 10
    assert "final/val/mmcs" not in events.Tags()["scalars"]  # not finite: left out
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["model.d_sae"].number_value == 64
    assert start.hparams["model.target_l0"].number_value == 4.0
