"""Rewards for tests/test_reward_server.py, registered when imported (the server runs ``--import`` on this module).

``prompt_brightness`` takes prompts and images in [0, 1]: the mean pixel plus 0.01 per prompt character.
A few prompts steer the server for the tests (plain prompts are scored normally):

- ``"sleep=S"``: sleeps S seconds first (timeouts);
- ``"fail-once=KEY"``: raises RuntimeError the first time KEY is seen in this process (HTTP 500, retries);
- ``"bad-output"``: returns one reward too few (the server's output check, HTTP 500).
"""

import time

import torch

from orwcfm_fast.rewards import Reward, register_reward

_seen_keys = set()


class PromptBrightness(Reward):
    takes_prompts = True
    input_range = (0.0, 1.0)
    name = "prompt_brightness"

    def forward(self, images, prompts=None):
        out = images.float().mean(dim=tuple(range(1, images.dim())))
        if prompts is None:
            return out
        for p in prompts:
            if p.startswith("sleep="):
                time.sleep(float(p.split("=", 1)[1]))
            if p.startswith("fail-once="):
                key = p.split("=", 1)[1]
                if key not in _seen_keys:
                    _seen_keys.add(key)
                    raise RuntimeError(f"flaky failure for {key}")
            if p == "bad-output":
                return out[:-1]
        return out + 0.01 * torch.tensor([len(p) for p in prompts], dtype=torch.float32, device=out.device)


register_reward("prompt_brightness", lambda config, device: PromptBrightness(), overwrite=True)
