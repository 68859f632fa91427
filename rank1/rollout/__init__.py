"""Rollout engines (vLLM, transformers) serving a live rank-1 adapter, and their Ray actor group.

engine.py   the interface: SamplingSpec, Completion, AdapterReceipt, RolloutEngine
vllm_engine.py / hf_engine.py   the two backends
sync.py     push an adapter version to every engine through the object store and verify it is served
actors.py   EngineActor / EngineGroup: restartable engine actors with batch retry
"""
