"""A person on a machine: ``rawvm shell`` (shell.py), ``rawvm cp`` (copy.py), ``rawvm forward`` (forward.py) and
``rawvm notebook`` (notebook.py: JupyterLab forwarded, the project kept in sync both ways by sync.py).

Each rides a websocket of the agent's mutual-TLS API (``rawvm_agent.interactive_api``) through the one agent
client: no SSH keys, nothing opened in any security group. ``target`` finds the machine a command names.
"""
