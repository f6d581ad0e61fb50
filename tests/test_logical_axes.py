"""Every parameter of every model carries logical axis names the sharding rules know."""

from __future__ import annotations

import pytest
from flax import nnx

from xblip_jax import sharding
from xblip_jax.convert.mapping import path_str
from xblip_jax.models.encoders import registry
from xblip_jax.models.layers import Precision
from xblip_jax.models.llm.llama import LlamaConfig
from xblip_jax.models.qformer import QFormerConfig
from xblip_jax.models.xblip import XBlipConfig, XInstructBlip

KNOWN = {name for name, _ in sharding.DEFAULT_RULES} | {"kernel", "conv_in", "conv_out", None}


def _bridge(**kw):
  cfg = XBlipConfig(encoder_widths=(("image", 48), ("audio", 32)), qformer=QFormerConfig.tiny(),
                    llm=LlamaConfig.tiny(), num_query_tokens=4, **kw)
  encoders = {m: registry.build_encoder(m, registry.encoder_config(m, {"preset": "tiny"}, m),
                                        precision=Precision(), rngs=nnx.Rngs(0))
              for m in ("image", "audio", "pc")}
  return XInstructBlip(cfg, rngs=nnx.Rngs(0), encoders=encoders)


@pytest.mark.parametrize("variant", [{}, {"shared_qformer": True}, {"projection_only": True}],
                         ids=["per_modality", "shared", "projection_only"])
def test_every_parameter_has_logical_axes(variant):
  model = nnx.eval_shape(lambda: _bridge(**variant))
  missing, unknown = [], []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    ndim = len(var.get_value().shape)
    if axes is None or len(axes) != ndim:
      missing.append(f"{path_str(path)} {var.get_value().shape} axes={axes}")
    elif set(axes) - KNOWN:
      unknown.append(f"{path_str(path)}: {set(axes) - KNOWN}")
  assert not missing, "parameters without logical axes:\n" + "\n".join(missing)
  assert not unknown, "unknown logical axis names:\n" + "\n".join(unknown)


def test_logical_names_map_to_mesh_axes_once():
  spec = sharding.logical_to_spec(("batch", "embed", "mlp"))
  assert spec == sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  assert sharding.logical_to_spec(("embed", "heads")) == sharding.PartitionSpec("fsdp", "tensor")
