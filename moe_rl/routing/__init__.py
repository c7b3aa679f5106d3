"""MoE routing: drift and load metrics, capture and replay of top-k routes."""
