"""How privacy is enforced: the DP-SGD trainer (Opacus), accounting, round instructions.

`trainer.train_round` runs one round of local training, `accounting.epsilon` turns an
accountant history into (epsilon, delta), and `instructions.RoundInstructions` is what the
coordinator asks of an institution each round.
"""
