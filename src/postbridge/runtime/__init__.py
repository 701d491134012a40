"""The flow runtime: mailbox -> target flows with a durable message log, leases, health and metrics."""
