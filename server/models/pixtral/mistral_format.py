"""The Mistral on-disk format of Pixtral (`mistralai/Pixtral-12B-2409`): `params.json`,
`consolidated.safetensors`, `tekken.json`.

- Config: `params.json` has the decoder's sizes under Mistral names (`dim`, `n_layers`,
  `head_dim`, `hidden_dim`, `n_heads`, `n_kv_heads`, `rope_theta`, `norm_eps`, `vocab_size`)
  and a `vision_encoder` section (`hidden_size`, `intermediate_size`, `num_hidden_layers`,
  `num_attention_heads`, `num_channels`, `image_size`, `patch_size`, `rope_theta`,
  `image_token_id`, `image_break_token_id`, `image_end_token_id`, `adapter_bias`). The vision
  MLP is SiLU-gated and the features come from the last vision layer.
- Weights: `tok_embeddings`, `layers.{i}.attention.w{q,k,v,o}`, `layers.{i}.feed_forward.w{1,2,3}`
  (gate, down, up), `layers.{i}.attention_norm` / `ffn_norm`, `norm`, `output`;
  `vision_encoder.{patch_conv, ln_pre, transformer.layers.{i}.*}` with the same inner names;
  `vision_language_adapter.w_in` / `w_out` (the projector). Mistral's RoPE rotates
  interleaved pairs (2i, 2i+1) of each head (complex form), ours rotate-half pairs (i, i + D/2):
  the rows of every wq / wk are permuted per head (what transformers' converter does), which
  turns both the 1-D text RoPE and the 2-D vision RoPE into the rotate-half form.
- Tokenizer and chat: `tekken.json` through mistral-common. The prompt is mistral-common's
  own `encode_chat_completion`, with its image encoder replaced by ours (`_ImageEncoder`) so
  pixels come from `PixtralImageProcessor(mode="mistral")` (no OpenCV at run time).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from vlmserve.models.pixtral.image_processor import PixtralImageProcessor

if TYPE_CHECKING:
    from vlmserve.models.pixtral.config import PixtralModelConfig

TOKENIZER_FILE = "tekken.json"
_MISTRAL_PREFIXES = ("tok_embeddings.", "layers.", "norm.", "output.", "vision_encoder.", "vision_language_adapter.")


# --- weights ------------------------------------------------------------------------------

_RENAMES = (
    (re.compile(r"^tok_embeddings\."), "language_model.model.embed_tokens."),
    (re.compile(r"^norm\."), "language_model.model.norm."),
    (re.compile(r"^output\."), "language_model.lm_head."),
    (re.compile(r"^layers\.(\d+)\.attention\.w([qkvo])\."), r"language_model.model.layers.\1.self_attn.\2_proj."),
    (re.compile(r"^layers\.(\d+)\.attention_norm\."), r"language_model.model.layers.\1.input_layernorm."),
    (re.compile(r"^layers\.(\d+)\.ffn_norm\."), r"language_model.model.layers.\1.post_attention_layernorm."),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w1\."), r"language_model.model.layers.\1.mlp.gate_proj."),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w2\."), r"language_model.model.layers.\1.mlp.down_proj."),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.w3\."), r"language_model.model.layers.\1.mlp.up_proj."),
    (re.compile(r"^vision_encoder\.(.*)\.attention\.w([qkvo])\."), r"vision_tower.\1.attention.\2_proj."),
    (re.compile(r"^vision_encoder\.(.*)\.feed_forward\.w1\."), r"vision_tower.\1.feed_forward.gate_proj."),
    (re.compile(r"^vision_encoder\.(.*)\.feed_forward\.w2\."), r"vision_tower.\1.feed_forward.down_proj."),
    (re.compile(r"^vision_encoder\.(.*)\.feed_forward\.w3\."), r"vision_tower.\1.feed_forward.up_proj."),
    (re.compile(r"^vision_encoder\."), "vision_tower."),
    (re.compile(r"^vision_language_adapter\.w_in\."), "multi_modal_projector.linear_1."),
    (re.compile(r"^vision_language_adapter\.w_out\."), "multi_modal_projector.linear_2."),
)


def is_mistral_weight_name(name: str) -> bool:
    return name.startswith(_MISTRAL_PREFIXES)


def interleaved_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection [H * D, in]: per head, output (2i, 2i+1) → (i, i + D/2)."""
    rows, cols = weight.shape
    return weight.view(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `interleaved_to_rotate_half` (used to write Mistral-format checkpoints)."""
    rows, cols = weight.shape
    return weight.view(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def mistral_to_hf_weight(name: str, tensor: torch.Tensor, cfg: PixtralModelConfig) -> tuple[str, torch.Tensor]:
    """A consolidated.safetensors tensor → (its published HF name, the tensor in HF layout)."""
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            hf_name = pattern.sub(repl, name, count=1)
            break
    else:
        return name, tensor  # reported as unexpected by the loader
    if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        if hf_name.startswith("vision_tower."):
            heads = cfg.vision.num_attention_heads
        else:
            heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
        tensor = interleaved_to_rotate_half(tensor, heads)
    return hf_name, tensor


# --- tokenizer and chat -------------------------------------------------------------------


def load_mistral_tokenizer(model_dir: str | Path) -> Any:
    """transformers' `MistralCommonBackend` over `tekken.json`: an HF-style tokenizer (decode,
    convert_ids_to_tokens) whose `.tokenizer` is mistral-common's `MistralTokenizer`."""
    from transformers.tokenization_mistral_common import MistralCommonBackend

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has params.json but no {TOKENIZER_FILE}; the Mistral format needs both")
    return MistralCommonBackend(tokenizer_path=str(path))


class _ImageEncoder:
    """Stands in for mistral-common's `ImageEncoder` (same call, same token layout), with our
    preprocessing: the image it returns is `PixtralImageProcessor.mistral_input`'s array (uint8
    [H, W, 3] source or float32 [3, rows * P, cols * P])."""

    def __init__(self, processor: PixtralImageProcessor, img: int, img_break: int, img_end: int) -> None:
        self.processor = processor
        self.img, self.img_break, self.img_end = img, img_break, img_end

    def __call__(self, chunk: Any) -> Any:
        from mistral_common.tokens.tokenizers.image import ImageEncoding, image_from_chunk

        array, (rows, cols) = self.processor.mistral_input(image_from_chunk(chunk))
        tokens = ([self.img] * cols + [self.img_break]) * rows
        tokens[-1] = self.img_end
        return ImageEncoding(tokens=tokens, image=array)


def install_image_encoder(
    mistral_tokenizer: Any, processor: PixtralImageProcessor, special_ids: tuple[int, int, int]
) -> None:
    """Replace the tokenizer's image encoder by ours, once, before any request (so no
    OpenCV at run time and one preprocessing path)."""
    if mistral_tokenizer.instruct_tokenizer.image_encoder is None:
        raise ValueError(f"{TOKENIZER_FILE} has no image section: it is not a Pixtral tokenizer")
    mistral_tokenizer.instruct_tokenizer.image_encoder = _ImageEncoder(processor, *special_ids)


def mistral_tool_call_id(call_id: str | None) -> str:
    """Mistral tokenizers take only 9-character alphanumeric call ids: any other id (OpenAI's
    `call_...`) maps to one by a hash, the same for the call and its result."""
    import hashlib
    import string

    if call_id and len(call_id) == 9 and call_id.isalnum() and call_id.isascii():
        return call_id
    alphabet = string.ascii_letters + string.digits
    n = int.from_bytes(hashlib.sha256((call_id or "").encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out)


def _tool_messages(msg: dict[str, Any]) -> Any:
    import json

    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    if msg.get("role") == "tool":
        return ToolMessage(content=msg.get("content") or "", tool_call_id=mistral_tool_call_id(msg.get("tool_call_id")))
    calls = []
    for c in msg["tool_calls"]:
        args = c["function"]["arguments"]
        calls.append(ToolCall(id=mistral_tool_call_id(c.get("id")), function=FunctionCall(
            name=c["function"]["name"], arguments=args if isinstance(args, str) else json.dumps(args))))
    return AssistantMessage(content=msg.get("content") or None, tool_calls=calls)


def encode_chat(
    mistral_tokenizer: Any,
    conversation: list[dict[str, Any]],
    images: list[Image.Image],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[np.ndarray]]:
    """Prompt ids of an HF-style conversation by mistral-common's `encode_chat_completion` (with
    `install_image_encoder` done), and the images' pixel arrays in prompt order (mistral-common may move an image before the text of
    its message). A final assistant message is continued (`prefix=True`). `tools` (OpenAI's
    shape), assistant `tool_calls` and `tool` messages go through mistral-common's own tool
    encoding ([AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS])."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    remaining = list(images)
    messages: list[Any] = []
    for i, msg in enumerate(conversation):
        role, content = msg.get("role"), msg.get("content")
        if role == "tool" or msg.get("tool_calls"):
            messages.append(_tool_messages(msg))
            continue
        if isinstance(content, list):
            chunks: list[Any] = []
            for part in content:
                if part.get("type") == "image":
                    if not remaining:
                        raise ValueError("the conversation has more image parts than images were given")
                    chunks.append(ImageChunk(image=remaining.pop(0)))
                elif part.get("type") == "text":
                    chunks.append(TextChunk(text=part.get("text", part.get("content", ""))))
                else:
                    raise ValueError(f"messages[{i}]: content part type {part.get('type')!r} is not supported")
            content = chunks
        if role == "user":
            messages.append(UserMessage(content=content))
        elif role == "system":
            messages.append(SystemMessage(content=content))
        elif role == "assistant":
            last = i == len(conversation) - 1
            text = content if isinstance(content, str) else "".join(c.text for c in content)
            messages.append(AssistantMessage(content=text, prefix=last and not add_generation_prompt))
        else:
            raise ValueError(f"messages[{i}]: role {role!r} is not supported; use system, user, assistant or tool")
    if remaining:
        raise ValueError(f"{len(images)} image(s) were given but the conversation has {len(images) - len(remaining)}")

    if not isinstance(mistral_tokenizer.instruct_tokenizer.image_encoder, _ImageEncoder):
        raise RuntimeError("call install_image_encoder before encode_chat")
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    mistral_tools = [Tool(function=Function(name=t["function"]["name"], description=t["function"].get("description", ""),
                                            parameters=t["function"].get("parameters", {})))
                     for t in tools or ()]
    tokenized = mistral_tokenizer.encode_chat_completion(
        ChatCompletionRequest(messages=messages, tools=mistral_tools or None))
    return list(tokenized.tokens), list(tokenized.images)
