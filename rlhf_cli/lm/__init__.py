"""The language-model layer every online algorithm and the evaluation share: prompt encoding,
sampling with captured log-probs, forward inputs, log-probs and masking."""
