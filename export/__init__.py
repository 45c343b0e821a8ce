"""Export: sub-model + local objective -> on-device training artifact."""
