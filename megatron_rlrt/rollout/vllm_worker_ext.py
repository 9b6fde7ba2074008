"""Loaded INSIDE vLLM's worker processes (``--worker-extension-cls
megatron_rlrt.rollout.vllm_worker_ext.WeightSyncExtension``); imports nothing of megatron_rlrt.

vLLM 0.32's in-place ``reload_weights`` (layerwise reload) unties tied embeddings: the
``ParallelLMHead`` shares its Parameter with ``embed_tokens``, loads no weights of its own
("ParallelLMHead: Failed to load weights") and gets its OLD tensors placed back, so a
tied-embedding model (Qwen3-0.6B..4B) keeps a stale LM head after a weight update. This
extension reloads, then re-ties the head to the new embedding and re-runs the head's
post-load processing (on CPU that re-packs the GEMM weights). Called through
``POST /collective_rpc {"method": "megatron_rlrt_reload_weights", "kwargs": {"weights_path": DIR}}``.

On the CPU build a second problem: ``UnquantizedLinearMethod.process_weights_after_loading``
packs each linear weight for oneDNN and then REMOVES the weight (``remove_weight=True``), so the
layerwise reload finds nothing to load into and puts the old packed weights back: every linear
layer stays stale. Importing this module (vLLM imports the extension in each worker before
loading the model) makes the CPU dispatch keep the weight (``remove_weight=False``, as vLLM
already does for embeddings), at the cost of a second copy of the linear weights in host
memory. GPU builds are unaffected.
"""

from __future__ import annotations


_CPU_DISPATCH = None  # vLLM's own dispatch_cpu_unquantized_gemm, on the CPU build


def _keep_cpu_linear_weights() -> None:
    global _CPU_DISPATCH
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        import vllm.model_executor.layers.utils as layer_utils

        original = layer_utils.dispatch_cpu_unquantized_gemm
        if getattr(original, "_megatron_rlrt_keeps_weight", False):
            return

        def dispatch_keeping_weight(layer, remove_weight: bool) -> None:
            original(layer, remove_weight=False)

        dispatch_keeping_weight._megatron_rlrt_keeps_weight = True
        _CPU_DISPATCH = original
        layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight
    except Exception:  # noqa: BLE001 - an older/newer vLLM without this function: nothing to patch
        pass


_keep_cpu_linear_weights()


class WeightSyncExtension:
    def megatron_rlrt_reload_weights(self, weights_path: str) -> dict:
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        model = self.model_runner.get_model()
        hf_config = self.model_runner.model_config.hf_text_config
        retied = False
        if getattr(hf_config, "tie_word_embeddings", False):
            lm_head = getattr(model, "lm_head", None)
            embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if lm_head is not None and embed is not None and hasattr(lm_head, "weight") \
                    and lm_head.weight is not embed.weight:
                lm_head.weight = embed.weight
                method = getattr(lm_head, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(lm_head)
                retied = True
        repacked = 0
        if _CPU_DISPATCH is not None:
            # Rebuild every packed CPU GEMM from the weights now in place (the reload does not
            # reliably re-run it for layers whose processed tensors it restores).
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if hasattr(module, "cpu_linear") and isinstance(weight, __import__("torch").Tensor) \
                        and weight.ndim == 2 and weight.numel() > 0:
                    _CPU_DISPATCH(module, remove_weight=False)
                    repacked += 1
        return {"weights_path": weights_path, "retied_lm_head": retied, "repacked_cpu_gemms": repacked}

    def megatron_rlrt_param_sums(self) -> dict:
        """{parameter name: float sum} of the served model (debugging a weight update)."""
        model = self.model_runner.get_model()
        return {name: float(p.detach().float().sum()) for name, p in model.named_parameters()}
