"""The reliability suite's summary at the end of the run (tests/reliability.py; printed once for both suites),
and the real-agent-process and fake-IMDS fixtures of tests/agent/test_agent_process.py."""

from tests.agent.test_agent_process import imds, start_agent
from tests.reliability import pytest_runtest_logreport, pytest_terminal_summary

__all__ = ["imds", "pytest_runtest_logreport", "pytest_terminal_summary", "start_agent"]
