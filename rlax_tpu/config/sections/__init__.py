"""One module per config section: ``defaults()`` documents every field, ``validate()`` checks it."""

from rlax_tpu.config.sections import (  # noqa: F401
    env,
    eval,
    inference,
    launch,
    lora,
    mesh,
    model,
    replay,
    rl,
    sandbox,
    sft,
    store,
    task,
    tokenizer,
    trainer,
)
