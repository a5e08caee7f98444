"""--compile aot: the transformer's repeated blocks compiled ahead of time (torch.export, then AOTInductor), the way
ZeroGPU runs compiled code (torch.compile does not run there; spaces.aoti_* does).

One program per block class and input signature serves every block of that class: a program holds code, not
weights, and each call hands it the calling block's own tensors (its state_dict) as user-managed constants, the way
`spaces.aoti_blocks_load` does. Those are the live tensors, so LoRAs hot-swapped into the adapter slots in place
(fluxdemo.lora.hotswap) reach the compiled code without a recompile, and so does a transformer moved between
devices. A new image size is a new signature: compiled once more, or run eager once MAX_PROGRAMS are compiled or the
blocks are `frozen` (ZeroGPU, where compiling inside a visitor's task would spend their quota).

Programs are plain bytes (a .pt2 archive), so they cross processes: ZeroGPU compiles in a GPU task and hands them
back to the main process (`programs()` / `adopt()`); each process loads an archive the first time it runs it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch._inductor.cpu_vec_isa import valid_vec_isa_list
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

# Programs compiled per process at most (two block classes x a few image sizes): past it, a new size runs eager, so
# that visitors choosing sizes cannot keep the server compiling.
MAX_PROGRAMS = 8
# Weights stay outside the archive (handed in at each call), and tensor constants stay named, as spaces.aoti_compile
# sets them.
INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,
    "always_keep_tensor_constants": True,
    "joint_graph_constant_folding": False,
}

Signature = tuple[str, tuple]
Key = tuple[str, Signature]  # (block class, signature)


def package(exported: torch.export.ExportedProgram) -> bytes:
    """The exported block compiled to a .pt2 archive without its weights: on a ZeroGPU Space by spaces.aoti_compile
    (ZeroGPU's settings, and its fix for the shared objects' stack flag), elsewhere by torch's own AOTInductor."""
    if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true"):
        import spaces  # it imports gradio and patches torch: only on a Space, and only when compiling there

        return spaces.aoti_compile(exported).archive_file.getvalue()
    archive = io.BytesIO()
    torch._inductor.aoti_compile_and_package(exported, package_path=archive, inductor_configs=INDUCTOR_CONFIGS)
    return archive.getvalue()


def signature(args: tuple, kwargs: Mapping[str, Any]) -> Signature:
    """What a compiled program is specialised on: the call's structure, each tensor's shape, dtype and device, and
    every other value as it is (tensors reach it contiguous: AheadOfTime.run)."""
    leaves, spec = pytree.tree_flatten((args, dict(kwargs)))
    return str(spec), tuple(
        (tuple(x.shape), str(x.dtype), str(x.device)) if isinstance(x, torch.Tensor) else repr(x) for x in leaves
    )


class Program:
    """One compiled block: its archive, and the archive loaded in this process."""

    def __init__(self, archive: bytes) -> None:
        self.archive = archive
        self._runner = None
        self._weights: dict[int, dict[str, torch.Tensor]] = {}  # by block: its parameters and buffers, by name

    def __call__(self, block: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        if self._runner is None:
            self._runner = torch._inductor.aoti_load_package(io.BytesIO(self.archive))
        weights = self._weights.get(id(block))
        if weights is None:  # the Parameter objects themselves: a device move or a LoRA swap changes their data only
            names = set(self._runner.get_constant_fqns())
            weights = {k: v for k, v in block.state_dict(keep_vars=True).items() if k in names}
            self._weights[id(block)] = weights
        # user-managed: the program reads these very tensors where they are now, so in-place LoRA swaps need no load
        self._runner.load_constants(weights, check_full_update=True, user_managed=True)
        return self._runner(*args, **kwargs)


class AheadOfTime:
    """The repeated blocks of a transformer, each running its class's compiled program."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.frozen = False  # True: a signature without a program runs eager instead of compiling
        self.sizes: set[tuple[int, int]] = set()  # (width, height) compiled for when frozen (zero_gpu.compile_ahead)
        self.compiled = 0  # programs compiled in this process (the rest were adopted)
        self._programs: dict[Key, Program] = {}
        self._failed: set[Key] = set()  # signatures export or AOTInductor refused: eager, never tried again
        transformer.requires_grad_(False)  # export refuses inference tensors that ask for gradients
        classes = set(getattr(transformer, "_repeated_blocks", ()))
        for block in transformer.modules():
            if type(block).__name__ in classes:
                block.forward = _Compiled(self, block)

    def programs(self) -> dict[Key, bytes]:
        """Every program compiled or adopted, as archives: what a ZeroGPU task hands back to the main process."""
        return {key: program.archive for key, program in self._programs.items()}

    def adopt(self, archives: Mapping[Key, bytes]) -> None:
        """Programs compiled elsewhere (another process, same model and device kind), run from now on."""
        self._programs.update((key, Program(archive)) for key, archive in archives.items())
        valid_vec_isa_list()  # its C++ probes take seconds: once here, not in each ZeroGPU worker (as spaces does)

    def run(self, block: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        # a program assumes the strides it was compiled for: contiguous ones, always (a no-op for most inputs)
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, dict(kwargs)))
        key = (type(block).__name__, signature(args, kwargs))
        program = self._programs.get(key)
        if program is None and not (self.frozen or len(self._programs) >= MAX_PROGRAMS or key in self._failed):
            program = self._compile(block, args, kwargs, key)
        if program is None:
            return type(block).forward(block, *args, **kwargs)
        return program(block, args, kwargs)

    def _compile(self, block: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any], key: Key) -> Program | None:
        """The block's program for this signature, kept; None (and a warning, once) when it cannot be compiled."""
        logger.info("Compiling %s ahead of time; every block of its class runs the program.", type(block).__name__)
        compiled = block.__dict__.pop("forward")  # export traces the class's own forward
        try:
            with torch.inference_mode(False):  # export's fake tensors need autograd's bookkeeping
                exported = torch.export.export(block, tuple(args), dict(kwargs))
            program = self._programs[key] = Program(package(exported))
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager block draws the same picture
            logger.warning("%s could not be compiled ahead of time (%s); it runs eager at this size.", key[0], e)
            self._failed.add(key)
            return None
        finally:
            block.forward = compiled
        self.compiled += 1
        return program


class _Compiled:
    """A block's forward: its class's program for the call's signature."""

    def __init__(self, blocks: AheadOfTime, block: torch.nn.Module) -> None:
        self._blocks, self._block = blocks, block

    def __call__(self, *args, **kwargs) -> Any:
        return self._blocks.run(self._block, args, kwargs)
