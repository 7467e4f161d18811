"""The node agent: one process per machine that runs its GPU workers (`tokenhive node`)."""
