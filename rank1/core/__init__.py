"""The floor every role stands on: the config tree, models, data, adapter folders, worker groups.

Nothing here imports a role (trainer, rollout, rewards, sae, export) or the driver.
"""
