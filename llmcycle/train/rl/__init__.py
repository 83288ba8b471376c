"""Online RL: PPO and GRPO, their arithmetic, rollouts and rewards."""
