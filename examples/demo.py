# The demo job: a CSV in, a pandas summary printed, a Matplotlib figure out.
# Run it with:  ./bootstrap.sh demo   (or through any runnerd daemon)
import matplotlib.pyplot as plt
import pandas as pd

df = pd.read_csv("sales.csv")
print(df.describe().round(1))

by_region = df.groupby("region")["sales"].sum().sort_values()
print("\nTotal sales by region:")
print(by_region.to_string())

ax = by_region.plot.barh(title="Sales by region, 2026", color="tab:blue")
ax.set_xlabel("units sold")
plt.tight_layout()
plt.savefig("sales_by_region.png", dpi=120)
plt.close()

monthly = df.pivot(index="month", columns="region", values="sales")
monthly.plot(title="Monthly sales by region")
plt.xticks(rotation=45)
plt.tight_layout()
# Left open: runnerd renders it, as a notebook would show it.
