"""Effects under diffusers' context parallelism (`model.enable_parallelism(config=ContextParallelConfig(...))`).

Under context parallelism every process holds a slice of the token sequence, and diffusers' attention
dispatcher exchanges it inside the kernel (Ulysses: an all-to-all to the whole sequence with H/P heads; ring:
the key/value chunks passed round). Effects need the whole sequence (token grids, windows, masks over image
tokens, global token counts), so at a site with effects the host does the Ulysses exchange itself, above the
effect stack:

    q, k, v  [B, S/P, H, D]  --all-to-all-->  [B, S, H/P, D]  --effects + a local kernel-->  --all-to-all-->  [B, S/P, H, D]

over the flattened context-parallel mesh, whatever the user chose (Ulysses, ring or both): the sequence is
sharded over that mesh, so the result is exact for every effect; sites without effects keep diffusers' own
kernel (ring stays ring there). FLUX shards its text and its image tokens separately, so after the exchange
the sequence is [text₀, image₀, text₁, image₁, …]; it is put back in [text, image] order for the effects
and restored afterwards. RoPE tables are gathered the same way. The call carries a `HeadShard`: effects map
global head numbers to the local ones and average head means over the processes.

Needs the heads divisible by the mesh size and the even split (not `ulysses_anything`/`ring_anything`);
otherwise every process raises the same error before any exchange (never a rank-dependent decision).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from diffusers.models.attention_dispatch import _all_to_all_single

from ..call import HeadShard, RopeInfo

#: the name diffusers gives the input-splitting hook of a model's top-level CP plan entry ("")
_TOP_SPLIT_HOOK = "cp_input---"


def context_config(parallel_config):
    """The set-up `ContextParallelConfig` of a processor's or model's `_parallel_config` (or the config itself),
    None without context parallelism."""
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    return cp if getattr(cp, "_flattened_mesh", None) is not None else None


def context_world(parallel_config) -> int:
    """How many processes share the token sequence (1 without context parallelism)."""
    cp = context_config(parallel_config)
    return 1 if cp is None else cp._flattened_mesh.size()


def check_supported(cp, heads: int, where: str = "") -> None:
    """Raise ValueError when attnlab cannot run effects under this context-parallel configuration."""
    if cp.ulysses_anything or cp.ring_anything:
        raise ValueError(
            f"attnlab effects{where} need the even context-parallel split; ulysses_anything/ring_anything give "
            "processes unequal sequence slices. Use ContextParallelConfig(ulysses_degree=N) with a token count "
            "divisible by N")
    world = cp._flattened_mesh.size()
    if heads % world:
        raise ValueError(
            f"attnlab effects{where} exchange heads for tokens across the {world} context-parallel processes, so "
            f"the {heads} attention heads must be divisible by {world}; use a context-parallel degree that "
            "divides the head count")


class Exchange:
    """The exchange of one attention call over the flattened context-parallel mesh."""

    def __init__(self, cp, heads: int):
        mesh = cp._flattened_mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = dist.get_rank(self.group)
        self.heads = heads // self.world
        self.shard = HeadShard(self.rank * self.heads, heads, self.mean)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The average of `x` over the processes (identical on every process)."""
        return _waited(funcol.all_reduce(x.contiguous(), "sum", self.group)) / self.world

    def to_heads(self, x: torch.Tensor, text: int = 0) -> torch.Tensor:
        """[B, S/P, H, D] sequence slices -> [B, S, H/P, D], text first when each slice starts with `text` text tokens."""
        b, n, _, d = x.shape
        x = x.reshape(b, n, self.world, self.heads, d).permute(2, 1, 0, 3, 4).contiguous()
        x = _all_to_all_single(x, self.group)
        x = x.flatten(0, 1).permute(1, 0, 2, 3)
        return _text_first(x, self.world, text)

    def to_sequence(self, x: torch.Tensor, text: int = 0) -> torch.Tensor:
        """The inverse of `to_heads`: [B, S, H/P, D] -> [B, S/P, H, D] in the process's own token order."""
        x = _rank_major(x, self.world, text)
        b, s, h, d = x.shape
        x = x.reshape(b, self.world, s // self.world, h, d).permute(1, 3, 0, 2, 4).contiguous()
        x = _all_to_all_single(x, self.group)
        return x.flatten(0, 1).permute(1, 2, 0, 3)

    def own_heads(self, x: torch.Tensor) -> torch.Tensor:
        """This process's heads of a tensor every process holds whole ([B, N, H, D], e.g. Wan's text keys)."""
        return x[:, :, self.rank * self.heads:(self.rank + 1) * self.heads]

    def gather(self, x: torch.Tensor, dim: int = 0, text: int = 0) -> torch.Tensor:
        """The whole sequence of a tensor sliced along `dim` (a RoPE table, position ids), text first."""
        whole = _waited(funcol.all_gather_tensor(x.contiguous(), dim, self.group))
        return _text_first(whole, self.world, text, dim)

    def rope(self, rope: Optional[RopeInfo], text: int = 0) -> Optional[RopeInfo]:
        if rope is None:
            return None
        return RopeInfo(self.gather(rope.cos, 0, text), self.gather(rope.sin, 0, text), rope.rotate, rope.embed)


def _waited(x: torch.Tensor) -> torch.Tensor:
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


def _text_first(x: torch.Tensor, world: int, text: int, dim: int = 1) -> torch.Tensor:
    """[text₀, image₀, text₁, image₁, …] along `dim` -> [text₀, text₁, …, image₀, image₁, …]."""
    if not text:
        return x
    slices = x.unflatten(dim, (world, -1))
    image = slices.narrow(dim + 1, text, slices.shape[dim + 1] - text)
    return torch.cat([slices.narrow(dim + 1, 0, text).flatten(dim, dim + 1), image.flatten(dim, dim + 1)], dim)


def _rank_major(x: torch.Tensor, world: int, text: int, dim: int = 1) -> torch.Tensor:
    """The inverse of `_text_first`."""
    if not text:
        return x
    n_text = text * world
    text_part = x.narrow(dim, 0, n_text).unflatten(dim, (world, text))
    image_part = x.narrow(dim, n_text, x.shape[dim] - n_text).unflatten(dim, (world, -1))
    return torch.cat([text_part, image_part], dim + 1).flatten(dim, dim + 1)


def exchange_for(parallel_config, heads: int, where: str = "") -> Optional[Exchange]:
    """The `Exchange` for a processor's `_parallel_config` (None without context parallelism)."""
    cp = context_config(parallel_config)
    if cp is None:
        return None
    check_supported(cp, heads, where)
    return Exchange(cp, heads)


def input_split(module: torch.nn.Module, hook_name: str):
    """The context-parallel config when diffusers' top-level input split runs before the hook `hook_name` on
    `module` (it was registered later, so the hook sees each process's slice of `hidden_states`), else None."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return None
    split = registry.get_hook(_TOP_SPLIT_HOOK)
    if split is None or "hidden_states" not in split.metadata or hook_name not in registry._hook_order:
        return None
    order = registry._hook_order
    if order.index(_TOP_SPLIT_HOOK) < order.index(hook_name):
        return None
    return context_config(split.parallel_config)


def gather_ids(cp, ids: torch.Tensor) -> torch.Tensor:
    """Position ids sliced along their first axis, whole again (same on every process)."""
    return _waited(funcol.all_gather_tensor(ids.contiguous(), 0, cp._flattened_mesh.get_group()))


def check_model(denoiser: torch.nn.Module, sites) -> None:
    """Refuse, at install time, a context-parallel model whose sites with effects attnlab cannot exchange.
    `sites`: (module, has effects) pairs."""
    cp = context_config(getattr(denoiser, "_parallel_config", None))
    if cp is None:
        return
    for module, active in sites:
        if active:
            check_supported(cp, int(module.heads), f" ({type(denoiser).__name__})")
