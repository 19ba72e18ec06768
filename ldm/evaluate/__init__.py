"""Scoring: metrics, classical filters and their tuning, sliding-window inference, pictures and
curves."""
