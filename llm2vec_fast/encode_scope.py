"""The eval-mode scope that concurrent encodes on one model share, and the check of the device they run on."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


class EvalScope:
    """One eval-mode scope shared by the encode calls running on a model at the same time.

    The first call to enter records every module's training flag, switches to eval and runs the encoder's one-time
    preparation for the device; the last one to leave restores the flags. Calls in between see eval mode
    throughout, whatever the order they end in.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._device = None
        self._saved_modes = None

    def __reduce__(self):
        return EvalScope, ()  # a copied or unpickled model starts with no encode running (locks do not pickle)

    @contextmanager
    def enter(self, encoder, device: torch.device):
        with self._lock:
            if self._active and device != self._device:
                raise RuntimeError(
                    f"an encode on {self._device} is running on this model; a concurrent encode must use the same "
                    f"device (got {device}). Pass device={str(self._device)!r} or wait for it to finish.")
            if not self._active:
                saved = [(module, module.training) for module in encoder.modules()]
                encoder.eval()
                try:
                    encoder._prepare_for_encoding(device)
                except BaseException:
                    _restore_modes(saved)
                    raise
                self._saved_modes, self._device = saved, device
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if not self._active:
                    _restore_modes(self._saved_modes)
                    self._saved_modes = self._device = None


def _restore_modes(saved: list) -> None:
    for module, training in saved:
        module.training = training


def usable_device(device) -> torch.device:
    """`device` (default: cuda if available, else cpu) after checking that the weights can live there.

    Checked before anything moves: a model sent to an unusable device (meta, a missing GPU) is left unusable.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device ({error}); pass e.g. 'cpu' or 'cuda:0'.") from None
    if device.type == "meta":
        raise ValueError("device='meta' holds no data, so the model cannot run there (and moving it would drop its "
                         "weights); pass 'cpu' or 'cuda'.")
    if device.type == "cpu":
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; pass device='cpu'.")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"device={str(device)!r} cannot be used here ({str(error)[:200]}); pass 'cpu' or an "
                         f"available accelerator.") from None
    return device
