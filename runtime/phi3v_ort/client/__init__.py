"""Using a running `phi3v-ort serve` from other commands: finding one (registry, discovery), starting and stopping
one (background, control), and generation through it (answer, chat) over a small HTTP transport."""
