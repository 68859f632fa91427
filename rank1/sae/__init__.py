"""Sparse autoencoders on rank-1 adapter activations (paper: arXiv:2511.06739).

Each rank-1 adapter's activation on a token is s = A·x (its lora_A output). `rank1 sae`:
    collect   capture s for every adapter (and baseline up_proj neurons) to resumable safetensors shards
    train     BatchTopK / TopK / ReLU SAE with AuxK, logged with FVU, L0, dead fraction and adapter
              effect recovered; saved in SAELens' format
    analyze   top examples, histograms, density of adapter directions (±), SAE latents and neurons
    explain   LLM explanations with detection scores and self-ratings (OpenAI-compatible or local)
    report    static HTML dashboard and PNG plots

Modules: capture (hooks), store (shards), collect, sae (config + module), sparse_step, trainer
(loop), effect, saelens_format, train (command), analyze, clients, explain, report, random_adapter,
documents, loading, cli. Nothing here imports the training loop (rank1.trainer).
"""
