"""``DownstreamEval``: while training, splice the SAE into its language model on held-out text and log the cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning import Callback, LightningModule, Trainer

from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.lm.access import ModelDtype, check_request, decoder_layers, load_model, model_source, text_source
from lightning_sae.lm.evaluate import (
    DEFAULT_CONTEXT_LENGTH,
    check_kind,
    check_model,
    resolve_site,
    splice_metrics,
    text_batches,
)
from lightning_sae.model import SparseAutoencoder

LOGGED = ("loss_recovered", "kl_score", "ce_sae", "kl_sae")
"""What :class:`DownstreamEval` logs, under ``downstream/``."""


class DownstreamEval(Callback):
    """Every ``every_n_steps`` training steps, splice the SAE into its language model on held-out
    text and log ``downstream/<name>`` for each of :data:`LOGGED` (definitions in the docstring of
    :mod:`lightning_sae.lm.evaluate`).

    The language model, layer, site, context length and special-token handling are those recorded
    in the training data's first file by ``lightning_sae cache``. The text is tokenised once, at
    setup; the evaluation runs on global rank 0 only. Does nothing when ``text`` is None.
    """

    def __init__(
        self,
        text: str | None = None,
        every_n_steps: int = 1000,
        max_tokens: int = 16_384,
        batch_size: int = 8,
        text_field: str = "text",
        split: str = "train",
        model_dtype: ModelDtype = "float32",
    ) -> None:
        """
        Args:
            text: Held-out text, in any form 'lightning_sae cache' reads; None turns the callback off.
            every_n_steps: Evaluate after every this many optimizer steps.
            max_tokens: Tokens of the text to evaluate on (whole windows, rounded down).
            batch_size: Context windows per forward pass of the language model.
            text_field: Field holding the text in JSON-lines records and datasets rows.
            split: Split to read when the datasets directory holds a DatasetDict.
            model_dtype: Dtype the language model computes in.
        """
        if every_n_steps < 1:
            raise UserError(f"DownstreamEval every_n_steps must be at least 1, got {every_n_steps}")
        self.text = text
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.text_field = text_field
        self.split = split
        self.model_dtype = model_dtype
        self._run: Callable[[SparseAutoencoder], dict[str, float]] | None = None
        self._last_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.text is None or stage != "fit" or not trainer.is_global_zero:
            return
        assert isinstance(pl_module, SparseAutoencoder)
        attrs = ActivationDataModule.of(trainer).infos[0].attrs
        layer, site = resolve_site(None, None, attrs)
        check_kind(pl_module, site)
        context_length = int(attrs.get("context_length", DEFAULT_CONTEXT_LENGTH))
        check_request(layer, context_length, self.batch_size, self.max_tokens)
        pieces = text_source(self.text, self.text_field, self.split)
        model_id, load_kwargs = model_source(attrs.get("model"), attrs.get("gguf_file") or None, None)
        tokenizer, lm = load_model(model_id, load_kwargs, self.model_dtype, trainer.strategy.root_device)
        blocks = decoder_layers(lm)
        check_model(pl_module, lm, blocks, layer, model_id)
        drop_special_tokens = bool(attrs.get("drop_special_tokens", True))
        batches = list(
            text_batches(tokenizer, pieces, context_length, self.batch_size, self.max_tokens, drop_special_tokens)()
        )
        if not batches:
            raise UserError(f"DownstreamEval: {self.text} holds fewer than context_length={context_length} tokens")

        def run(sae: SparseAutoencoder) -> dict[str, float]:
            return splice_metrics(lm, sae, blocks, layer, site, lambda: iter(batches))

        self._run = run

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._run is None or step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step
        assert isinstance(pl_module, SparseAutoencoder)
        metrics = self._run(pl_module.folded())
        pl_module.log_dict({f"downstream/{name}": metrics[name] for name in LOGGED}, rank_zero_only=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._run = None
