"""Operations commands: setup, dead-letter tools, queue statistics, the one-command local stack."""
