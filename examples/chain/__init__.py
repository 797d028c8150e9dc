"""The example chain: supervisor -> sub-agent -> sub-sub-agent, each a LangGraph graph over HTTP."""
