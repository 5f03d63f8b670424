"""The whole slidebridge stack on one machine: local serve/demo and the synthetic slide generator."""

from __future__ import annotations
