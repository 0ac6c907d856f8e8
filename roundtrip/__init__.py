"""IR -> dense weights again; behavioural diff; task and backdoor evaluation."""
