"""The core: scopes, the registry, the watcher, the process state and the records they share.

Nothing here imports an integration, the command line or test support; the store is
reached through its protocol (:mod:`otel_cancel.store`).
"""
