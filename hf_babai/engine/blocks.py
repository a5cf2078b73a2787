"""Finding the decoder blocks, bringing offloaded ones into memory, and running a block on cached inputs.

Works on any transformers decoder stack without knowing its architecture: the block list is the largest
``nn.ModuleList`` of identical modules that contain Linears, block-0 inputs are captured once with a forward
pre-hook (with every keyword the model passes its blocks: rotary embeddings, masks), and each block then runs on
those cached activations (kept on CPU).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import format_of
from ..spec import QuantSpec
from .routers import router_linears

log = logging.getLogger(__name__)

# nn.Linear subclasses whose forward is still x @ Wᵀ + b (written out by hand), so a quantized module may replace
# them. Any other subclass that overrides forward computes something else around its weight (Llama 4's and
# PhiMoE's routers return top-k scores, DeepSeek-V4's grouped projection splits its input, Ergo's logits are fp32)
# and stays float: replacing it with a plain quantized Linear would silently change the model.
LINEAR_EQUIVALENT = frozenset({"FalconLinear"})


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` whose forward a quantized Linear reproduces."""
    if not isinstance(module, nn.Linear):
        return False
    cls = type(module)
    return cls.forward is nn.Linear.forward or cls.__name__ in LINEAR_EQUIVALENT


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, OpenAI-GPT, GPT-SW3): ``x @ W + b`` with ``W`` stored ``[in, out]``, a
    Linear with its weight transposed (recognised by name and shape: the engine does not import transformers)."""
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False  # before touching .weight: a quantized module's .weight dequantizes
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dim() == 2


def is_quantizable(module: nn.Module) -> bool:
    return is_plain_linear(module) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or a Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linearize_conv1d(block: nn.Module, names: set[str] | None = None) -> None:
    """Replaces every Conv1D of ``block`` (those named in ``names``, if given) by the ``nn.Linear`` computing the
    same (weight transposed), so the engine quantizes it like any Linear; the quantized module then stands where the
    Conv1D stood, which is also where the loader puts it when the checkpoint is reloaded into the original class."""
    for name, mod in list(block.named_modules()):
        if not is_conv1d(mod) or (names is not None and name not in names):
            continue
        n_in, n_out = linear_dims(mod)
        w = mod.weight
        lin = nn.Linear(n_in, n_out, bias=mod.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w.detach().T)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.detach())
        replace_module(block, name, lin)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are stored."""


def _language_model(model: nn.Module) -> str:
    """The dotted name of the module holding the language model's blocks ("" for the whole model). transformers'
    ``get_decoder()`` names it for vision-language models (``model.language_model``), whose vision tower may hold
    more Linears than the decoder; the vision tower and projector then stay float."""
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None:
        return ""
    try:
        decoder = get_decoder()
    except Exception:  # models without a decoder rule raise: search the whole model
        return ""
    return next((name for name, mod in model.named_modules() if mod is decoder), "")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the ``nn.ModuleList`` of ≥2 same-class modules (or of modules that each hold Linears:
    hybrid models alternate layer classes) holding the most Linears, inside the language model
    (:func:`_language_model`) when the model names one."""
    root = _language_model(model)
    found = _largest_block_list(model, root) or (_largest_block_list(model, "") if root else None)
    if found is None:
        raise ValueError(
            "no decoder block list found: expected an nn.ModuleList of identical blocks (or of layers that each hold "
            "Linears) containing nn.Linear or Conv1D layers (e.g. model.model.layers)"
        )
    return found


def _linear_like(module: nn.Module) -> bool:
    """A Linear to quantize or one already quantized (so a quantized model's blocks are found the same way)."""
    return format_of(module) is not None or is_quantizable(module)


def _largest_block_list(model: nn.Module, root: str) -> tuple[str, nn.ModuleList] | None:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if root and not name.startswith(root + "."):
            continue
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(m) for m in mod}) != 1 and not all(any(map(_linear_like, m.modules())) for m in mod):
            continue  # a list of unlike modules is a decoder only if each one holds Linears (a hybrid's layers)
        n_lin = sum(_linear_like(x) for x in mod.modules())
        if n_lin and (best is None or n_lin > best[0]):
            best = (n_lin, name, mod)
    return None if best is None else (best[1], best[2])


def target_linears(
    block: nn.Module, skip: tuple[str, ...], prefix: str = "", routers: bool = False
) -> dict[str, nn.Linear]:
    """Linears (and GPT-2-style Conv1Ds, see :func:`is_quantizable`) of a block to quantize, in module order
    (block-relative names), minus those whose full name ``prefix + "." + name`` contains any ``skip`` substring
    and, unless ``routers`` (``QuantSpec.quantize_router``), the MoE routers' Linears (:mod:`.routers`)."""
    float_routers = set() if routers else router_linears(block)
    out = {}
    for n, m in block.named_modules():
        full = f"{prefix}.{n}" if prefix else n
        if is_quantizable(m) and format_of(m) is None and not any(s in full for s in skip) and n not in float_routers:
            out[n] = m
    return out


def quantizable_linears(model: nn.Module, spec: QuantSpec) -> dict[str, nn.Linear]:
    """Every Linear the engine quantizes, by full module name: the Linears inside the decoder blocks minus the
    ``spec.skip`` substrings (and the routers' unless ``spec.quantize_router``), then, with
    ``spec.vision_tower="rtn"``, those outside the language model (:func:`tower_linears`). Quantize-on-load and
    pre-quantized loading both use this one rule, so a checkpoint's packed modules are exactly the ones its loader
    rebuilds."""
    name, blocks = find_blocks(model)
    out = {
        f"{name}.{i}.{n}": lin
        for i, block in enumerate(blocks)
        for n, lin in target_linears(block, spec.skip, f"{name}.{i}", spec.quantize_router).items()
    }
    if spec.vision_tower == "rtn":
        out.update(tower_linears(model, spec.skip))
    return out


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head: the model's own, else its language model's (BLIP names none at the top)."""
    root = _language_model(model)
    for owner in (model, model.get_submodule(root) if root else None):
        head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
        if head is not None:
            return head
    return None


def tower_linears(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The Linears of a vision-language model outside its language model (vision tower, projector, any other
    encoder), by full name, minus the output head and the ``skip`` substrings; none for a text-only model (one
    whose ``get_decoder()`` names no submodule). Calibration text never reaches them, so they are only ever
    rounded to nearest (``QuantSpec.vision_tower``)."""
    root = _language_model(model)
    if not root:
        return {}
    head = output_head(model)
    return {
        n: m
        for n, m in model.named_modules()
        if not n.startswith(root + ".")
        and m is not head
        and is_quantizable(m)
        and format_of(m) is None
        and not any(s in n for s in skip)
    }


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device if it dispatched the module, else the device
    of its first non-meta tensor (meta tensors are disk- or CPU-offloaded weights), else CPU."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def onload_block(block: nn.Module) -> None:
    """Materialises the accelerate-offloaded (CPU or disk) weights of ``block`` on its execution device and
    removes those offload hooks, so the block can be quantized as a plain module. Blocks that are not offloaded
    are left untouched; non-offloading hooks (which move inputs between devices) are kept.

    The quantized block then stays resident at quantized size (packed buffers plus small norms), which is the
    point of quantize-on-load: peak memory is about one float block plus the quantized model."""
    for mod in list(block.modules()):
        hook = getattr(mod, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False):
            continue
        from accelerate.hooks import remove_hook_from_module

        hook.pre_forward(mod)  # loads the weights from the offload map onto the execution device
        hook.offload = False  # so detaching does not send them back to meta
        remove_hook_from_module(mod)


def text_entry(
    model: nn.Module, blocks_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> nn.Module:
    """The module that calibration text is fed to: ``model`` itself when its forward reaches the decoder blocks
    from token ids, else its language model.

    A vision-language model whose forward insists on an image (BLIP-2 and InstructBLIP take ``pixel_values`` as a
    required argument, Kosmos-2 raises without one) can still be calibrated with text: its language model (the
    outermost module on the way to the blocks whose forward takes ``input_ids``) is what the text would reach, and
    the vision tower and projector stay float anyway. That switch is logged, never silent. It is refused instead
    when the language model leaves Linears of its first block uncalled on text alone (a decoder that cross-attends
    to the image encoder's outputs: BLIP's, UDOP's, a VisionEncoderDecoder's), since those layers would get
    no calibration, and when no module inside the model runs on token ids alone (IDEFICS, Pix2Struct, draft
    models that need their main model's states). One calibration window is run for the check, up to block 0
    (through it for the language model)."""
    probe_ids = input_ids[:1]  # a whole window: some models need its length (Reformer's chunks)
    probe_mask = None if attention_mask is None else attention_mask[:1]
    blocks = model.get_submodule(blocks_name)
    try:
        _reaches(model, blocks[0], probe_ids, probe_mask, {})
        return model  # reaching block 0 or not: a forward that ends before it is refused by the caller, by name
    except Exception as exc:
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    cls = type(model).__name__
    parts = blocks_name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        lm = model.get_submodule(prefix)
        if "input_ids" not in inspect.signature(lm.forward).parameters:
            continue
        called: dict[str, bool] = {
            n: False
            for n in target_linears(blocks[0], ())
            if "experts" not in n.split(".")  # routed: may not run
        }
        try:
            if not _reaches(lm, blocks[0], probe_ids, probe_mask, called):
                continue
        except Exception:
            continue
        missed = [n for n, ran in called.items() if not ran]
        if missed:
            raise ValueError(
                f"{cls}'s forward does not run on token ids alone ({why}), and its language model `{prefix}` does not "
                f"call {', '.join(f'{blocks_name}.0.{n}' for n in missed[:4])} on text (a decoder that cross-attends "
                "to the image encoder's outputs): those layers can only be calibrated with images, which hf_babai "
                "does not do; method='rtn' quantizes without calibration"
            )
        log.warning(
            "%s's forward does not run on token ids alone (%s): calibrating through its language model `%s` with "
            "text only (the vision tower and projector stay float)", cls, why, prefix,
        )  # fmt: skip
        return lm
    raise ValueError(
        f"{cls}'s forward does not run on token ids alone ({why}), and no module on the way to its blocks "
        f"`{blocks_name}` does: hf_babai calibrates with text only, so this model cannot be calibrated "
        "(method='rtn' quantizes without calibration)"
    )


def _reaches(
    entry: nn.Module, block: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, called: dict[str, bool]
) -> bool:
    """Runs ``entry`` on ``ids`` until ``block`` is reached (through it when ``called`` names Linears of the block
    to watch, each marked True once it runs); whether it was reached. Raises whatever the forward raises."""
    reached = []

    def stop(*_):
        reached.append(True)
        raise _StopForward

    mark = [lambda *_, n=n: called.__setitem__(n, True) for n in called]
    watched = [block.get_submodule(n).register_forward_hook(f) for n, f in zip(called, mark, strict=True)]
    handle = block.register_forward_hook(stop) if called else block.register_forward_pre_hook(stop)
    try:
        batch = {"input_ids": ids.to(execution_device(entry)), "use_cache": False}
        if mask is not None:
            batch["attention_mask"] = mask.to(batch["input_ids"].device)
        with torch.no_grad(), contextlib.suppress(_StopForward):
            entry(**batch)
    finally:
        handle.remove()
        for h in watched:
            h.remove()
    return bool(reached)


def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    progress: bool = False,
) -> list[tuple[torch.Tensor, dict]]:
    """Runs the model up to block 0 per calibration batch and returns ``(hidden_states, kwargs)`` per batch
    (hidden states on CPU; the kwargs such as rotary embeddings and the causal mask as given)."""
    store: list[tuple[torch.Tensor, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, kwargs = _by_name(mod, args, kwargs)
        store.append((hidden.detach().cpu(), _replayable(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_batches(model, input_ids, attention_mask, batch_size, progress)
    finally:
        handle.remove()
    return store


def _replayable(kwargs: dict) -> dict:
    """A block call's keyword arguments as a replay needs them: no KV cache."""
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return kwargs


def _run_batches(model, input_ids, attention_mask, batch_size: int, progress: bool = False) -> None:
    device = execution_device(model)
    with torch.no_grad():
        starts = range(0, input_ids.shape[0], batch_size)
        for start in tqdm(starts, desc="calibration inputs", disable=not progress, leave=False):
            batch = {"input_ids": input_ids[start : start + batch_size].to(device), "use_cache": False}
            if attention_mask is not None:
                batch["attention_mask"] = attention_mask[start : start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(**batch)


def mixed_layer_types(model: nn.Module) -> tuple[str, ...] | None:
    """The distinct ``config.layer_types`` of a model whose decoder mixes kinds of layers (sliding-window and full
    attention, linear attention, ...), or ``None``. Such a model hands each kind of layer its own arguments (its
    own attention mask), so block 0's arguments cannot be replayed for every block."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    types = getattr(text, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(set(types)) < 2:
        return None
    return tuple(sorted(set(map(str, types))))


def capture_block_kwargs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    batch_size: int,
) -> list[list[dict]]:  # fmt: skip
    """Each block's keyword arguments for each calibration batch, as the model's own forward passes them.

    The forward runs with every block's ``forward`` replaced by a recorder that returns its input unchanged, so no
    block computes and no offloaded weight is loaded, and the last block's recorder ends the forward. A model whose
    forward cannot run that way gets an error naming the step; its blocks are never replayed with another
    block's arguments."""
    found: list[list[dict]] = [[] for _ in blocks]
    signatures = [inspect.signature(block.forward) for block in blocks]
    saved = [block.__dict__.get("forward") for block in blocks]

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden, kw = _bind(blocks[i], signatures[i], args, kwargs)
            found[i].append(_replayable(kw))
            if i == len(blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        _run_batches(model, input_ids, attention_mask, batch_size)
    except Exception as exc:
        raise ValueError(
            f"recording the arguments each block of this model receives failed ({type(exc).__name__}: {exc}); "
            f"the model mixes layer types {mixed_layer_types(model)}, so block 0's arguments cannot stand in for "
            "the others: please report the architecture"
        ) from exc
    finally:
        for block, original in zip(blocks, saved, strict=True):
            if original is None:
                del block.forward
            else:
                block.forward = original
    return found


def _by_name(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The hidden states and every other argument of a block call, by parameter name. Blocks are replayed as
    ``block(hidden, **kwargs)``, so arguments the model passed positionally (CPM-Ant's attention mask,
    RecurrentGemma's position ids, XLNet's second stream) are bound to their names here rather than lost."""
    return _bind(block, inspect.signature(block.forward), args, kwargs)


def _bind(block: nn.Module, sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:  # a signature that does not describe the call (a wrapped forward): keep what we were given
        if not args:
            return kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return args[0], dict(kwargs)
    params = sig.parameters
    named: dict = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(
                    f"{type(block).__name__}.forward takes *{name} and was called with {len(value)} extra positional "
                    "arguments: hf_babai cannot replay such a block by name; please report the architecture"
                )
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    first = next(iter(params))
    return named.pop(first), named


def move_to(obj, device: torch.device):
    """Tensors (also inside tuples/lists/dicts, e.g. rotary ``(cos, sin)``) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]], device: torch.device) -> list[torch.Tensor]:
    """The block's output hidden states for each cached input (on CPU)."""
    with torch.no_grad():
        return [_hidden(block(h.to(device), **move_to(kw, device))).detach().cpu() for h, kw in inputs]


def _hidden(out: torch.Tensor | tuple | list) -> torch.Tensor:
    """A block's output hidden states: the tensor itself, or the first item of the tuple/list/ModelOutput it
    returns (OpenAI-GPT's blocks return a list)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Sets the submodule ``name`` (dotted, relative to ``root``) to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def release_freed_memory() -> None:
    """Frees each block's float copies once it is quantized and returns the memory to the OS.

    The replaced Linears of an accelerate-offloaded block sit in reference cycles (its hooks wrap ``forward``
    in closures over the module), so they are only freed by the cycle collector: without ``gc.collect`` an
    offloaded run keeps one float block per quantized block."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """``malloc_trim`` (glibc only): hands freed heap back to the OS. glibc keeps freed mid-sized chunks (its mmap
    threshold grows to 32 MB as large tensors are freed), so the freed temporaries of one layer's solve would
    otherwise still count against the process while the next, wider layer allocates its own; called after each
    layer and each block (a few milliseconds)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass
