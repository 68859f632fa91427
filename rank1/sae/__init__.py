"""Sparse autoencoders on rank-1 adapter activations (paper: arXiv:2511.06739).

Each rank-1 adapter's activation on a token is s = A·x (its lora_A output). `rank1 sae`:
    collect   capture s for every adapter (and baseline up_proj neurons) to resumable safetensors shards
    train     BatchTopK / TopK / ReLU SAE with AuxK, logged with FVU, L0, dead fraction and adapter
              effect recovered (on the collection's own data and on other data sets); SAELens' format
    analyze   top examples (one per document), histograms, density of adapter directions (±), SAE
              latents and neurons, and each feature's maximum over random windows
    explain   LLM explanations with detection and fuzzing scores and self-ratings (OpenAI-compatible or local)
    report    static HTML dashboard and PNG plots
    random-adapter   a randomly initialised adapter, the control
    concepts  LLM-free score: each feature's best concept F1 on held-out documents, per family
    compare   two SAEs (SFT vs GRPO): shared and unique features; the adapters' change per module and layer
    ablate    leave-one-layer-out KL(full adapter || without layer L) on held-out text

Modules: capture (hooks), store (shards), collect, sae (config + module), sparse_step, trainer
(loop), effect, saelens_format, train (command), analyze, clients, scorers, explain, report,
random_adapter, concepts, concept_table, compare, adapter_change, compare_saes, ablate, plots,
documents, loading, cli. Nothing here imports the training loop (rank1.trainer).
"""
