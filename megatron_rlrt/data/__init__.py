"""Prompt data: files -> rendered, tokenized prompts -> resumable shuffled batches.

    from megatron_rlrt.data import DataConfig, PromptDataset, PromptLoader, TemplateConfig
    ds = PromptDataset.from_config(DataConfig(path="dapo-math-17k.parquet", max_prompt_length=1024,
                                              template=TemplateConfig(enable_thinking=False)), tok)
    loader = PromptLoader(ds, seed=1234)
    batch = loader.next_batch(32)            # list[PromptSample]
    state = loader.state_dict()              # into the checkpoint; loader.load_state_dict(state)

Bad-input rules: see ``megatron_rlrt.data.dataset``.
"""

from megatron_rlrt.data.dataset import DataConfig, DatasetStats, PromptDataset, PromptSample, load_prompt_dataset
from megatron_rlrt.data.errors import DatasetError
from megatron_rlrt.data.layouts import LAYOUTS, detect_layout
from megatron_rlrt.data.sampler import PromptLoader, ResumableSampler
from megatron_rlrt.data.template import PromptRenderer, TemplateConfig

__all__ = [
    "LAYOUTS",
    "DataConfig",
    "DatasetError",
    "DatasetStats",
    "PromptDataset",
    "PromptLoader",
    "PromptRenderer",
    "PromptSample",
    "ResumableSampler",
    "TemplateConfig",
    "detect_layout",
    "load_prompt_dataset",
]
