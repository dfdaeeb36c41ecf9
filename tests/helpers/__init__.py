"""Helpers shared by the tests (fake roles, tiny HF models, process drivers); not collected."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
