"""What code written for Hugging Face models calls on an `LLM2Vec`, forwarded to the decoder it wraps.

HF Trainer, PEFT-era training scripts and the reference's users reach for these (the reference itself has only
resize_token_embeddings and gradient_checkpointing_enable). Each is a one-line forward to the decoder inside the
task model or PEFT wrapper (`_decoder`), as sentence-transformers' PeftAdapterMixin forwards to its transformer;
only what needs more than a forward (a name change across transformers versions, counting an unmerged adapter's
parameters, our save) has a body.
"""

from __future__ import annotations

from typing import Optional

import torch

from .modeling import base_model, enable_gradient_checkpointing


def _forwarded(name: str, doc: str):
    """A method that calls the decoder's method `name` with the caller's arguments."""
    def method(self, *args, **kwargs):
        return getattr(self._decoder, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


class HuggingFaceModelMixin:
    """Hugging Face model methods for a module whose `model` attribute holds a (possibly PEFT-wrapped) decoder."""

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    @property
    def _decoder(self):
        """The decoder (LlamaModel and friends) inside `self.model`: the one forwarding target."""
        return base_model(self.model)

    enable_input_require_grads = _forwarded(
        "enable_input_require_grads",
        "Make the input embeddings' output require grad, so that reentrant checkpointing reaches the adapter.")
    disable_input_require_grads = _forwarded("disable_input_require_grads", "Undo `enable_input_require_grads`.")
    get_input_embeddings = _forwarded("get_input_embeddings", "The token embedding module of the wrapped model.")
    set_input_embeddings = _forwarded("set_input_embeddings",
                                      "Replace the token embedding module of the wrapped model.")
    resize_token_embeddings = _forwarded(
        "resize_token_embeddings",
        "Resize the token embeddings (after adding tokens to the tokenizer); returns the new embedding module. "
        "Arguments as Hugging Face's (new_num_tokens, pad_to_multiple_of, mean_resizing).")
    tie_weights = _forwarded("tie_weights", "Tie the wrapped model's shared weights (HF Trainer calls it after "
                                            "loading a checkpoint).")

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's first floating-point parameter."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    # --------------------------------------------------------------------------------- gradient checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """Recompute each decoder layer's activations in the backward pass (HF's method, on the wrapped model).

        gradient_checkpointing_kwargs: passed to torch.utils.checkpoint (e.g. {"use_reentrant": False}); kwargs:
        the HF method's others (every_n_layers, offload on transformers versions that have them)."""
        enable_gradient_checkpointing(self._decoder, gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        **kwargs) -> None:
        """transformers 5's name for `gradient_checkpointing_enable` (what its Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Undo `gradient_checkpointing_enable`."""
        decoder = self._decoder
        if hasattr(decoder, "activation_checkpointing_disable"):  # transformers >= 5.2x; 5.17 has the old name
            decoder.activation_checkpointing_disable()
        else:
            decoder.gradient_checkpointing_disable()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any decoder layer recomputes its activations in the backward pass."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    # ------------------------------------------------------------------------------------------- parameters

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (HF's method on the wrapped model; counts an unmerged adapter's too)."""
        if not exclude_embeddings:
            return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)
        return self._decoder.num_parameters(only_trainable=only_trainable, exclude_embeddings=True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of that name."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts (PEFT's output, for an unmerged adapter or not)."""
        if hasattr(self.model, "print_trainable_parameters"):
            self.model.print_trainable_parameters()
            return
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------------------------------------- save

    def save_pretrained(self, save_directory: str, state_dict: Optional[dict] = None,
                        safe_serialization: bool = True, **kwargs) -> None:
        """`save(save_directory)` under HF's name and signature (as Trainer-style code calls it).

        state_dict: weights to write instead of the module's own, keyed as `self.state_dict()` is (e.g. gathered
        by a distributed trainer). safe_serialization: only True (safetensors) is supported. kwargs go to the
        wrapped model's save_pretrained (max_shard_size, is_main_process, ...)."""
        from .saving import save_encoder

        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False) is not supported: llm2vec-fast writes "
                             "safetensors only. Drop the argument.")
        if state_dict is not None:
            prefix = "model."
            if any(not k.startswith(prefix) for k in state_dict):
                raise ValueError("save_pretrained(state_dict=...) expects the keys of LLM2Vec.state_dict() "
                                 "('model.' + the wrapped model's keys).")
            kwargs["state_dict"] = {k[len(prefix):]: v for k, v in state_dict.items()}
        save_encoder(self, save_directory, merge_before_save=False, save_config=True, model_kwargs=kwargs)
