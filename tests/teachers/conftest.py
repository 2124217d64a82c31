"""The real-SmolLM2 and vLLM fixtures of test_served.py, shared with the other served-model tests."""

from tests.teachers.test_served import smol_hf_dir, smol_live, vllm_python  # noqa: F401
