//! What a `MlflowInstance` may ask for: whoever may create one does not pick
//! any image or any amount of resources. Images come from the operator's
//! configuration (its defaults, or one of its allowed lists); resources and
//! the store size stay under the operator's ceilings; the expiry is capped by
//! the operator's longest TTL; the access mode is one the operator allows
//! (`link` only, by default); a credentials Secret is one granted to the
//! resource's owner (`crate::credentials`). (The owner is checked against the requesting
//! user by the ValidatingAdmissionPolicy in `k8s/operator`.)

use super::crd::MlflowInstanceSpec;
use crate::credentials::CredentialRules;
use crate::instance::Access;
use crate::settings::KubeSettings;

/// The operator's limits on what a resource asks for.
#[derive(Clone, Debug)]
pub struct CrdPolicy {
    /// MLflow images a resource may pick, besides the default.
    pub mlflow_images: Vec<String>,
    /// Adapter images a resource may pick, besides the default.
    pub adapter_images: Vec<String>,
    /// The most CPU a container may request or be limited to.
    pub max_cpu: String,
    /// The most memory a container may request or be limited to.
    pub max_memory: String,
    /// The largest artefact volume.
    pub max_store_size: String,
    /// The access modes a resource may ask for (`link` only, by default:
    /// a `public` instance opens for anyone with its URL).
    pub access: Vec<Access>,
    /// The credentials Secrets a resource may name, and the default.
    pub credentials: CredentialRules,
}

impl Default for CrdPolicy {
    fn default() -> Self {
        Self {
            mlflow_images: Vec::new(),
            adapter_images: Vec::new(),
            max_cpu: "2".into(),
            max_memory: "4Gi".into(),
            max_store_size: "20Gi".into(),
            access: vec![Access::Link],
            credentials: CredentialRules::default(),
        }
    }
}

/// A Kubernetes quantity (`100m`, `1.5`, `512Mi`, `2G`, `1e3`) as a number of
/// base units; None for what is not one.
pub fn quantity(raw: &str) -> Option<f64> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    (number.is_finite() && number >= 0.0).then_some(number * factor)
}

fn within(field: &str, value: &str, ceiling: &str) -> Result<(), String> {
    match (quantity(value), quantity(ceiling)) {
        (Some(v), Some(c)) if v <= c => Ok(()),
        (Some(_), Some(_)) => Err(format!(
            "{field} {value} is above the operator's ceiling of {ceiling}"
        )),
        (None, _) => Err(format!("{field} {value:?} is not a quantity")),
        (Some(_), None) => Err(format!(
            "the operator's ceiling for {field}, {ceiling:?}, is not a quantity"
        )),
    }
}

impl CrdPolicy {
    /// The operator's settings with the resource's image and resource
    /// choices, or why the resource may not have them.
    pub fn settings_for(
        &self,
        base: &KubeSettings,
        spec: &MlflowInstanceSpec,
    ) -> Result<KubeSettings, String> {
        let mut s = base.clone();
        if !self.access.contains(&spec.access) {
            return Err(format!(
                "access {} is not one the operator allows ({})",
                spec.access,
                self.access
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(image) = &spec.image {
            if let Some(m) = &image.mlflow {
                if *m != base.mlflow_image && !self.mlflow_images.contains(m) {
                    return Err(format!(
                        "image.mlflow {m:?} is not one the operator allows ({})",
                        allowed(&base.mlflow_image, &self.mlflow_images)
                    ));
                }
                s.mlflow_image = m.clone();
            }
            if let Some(a) = &image.adapter {
                if *a != base.adapter_image && !self.adapter_images.contains(a) {
                    return Err(format!(
                        "image.adapter {a:?} is not one the operator allows ({})",
                        allowed(&base.adapter_image, &self.adapter_images)
                    ));
                }
                s.adapter_image = a.clone();
            }
        }
        if let Some(r) = &spec.resources {
            let pair = |rl: &super::crd::RequestLimit| (rl.request.clone(), rl.limit.clone());
            let containers = [
                ("mlflow", &r.mlflow, &mut s.mlflow_cpu, &mut s.mlflow_memory),
                (
                    "adapter",
                    &r.adapter,
                    &mut s.adapter_cpu,
                    &mut s.adapter_memory,
                ),
            ];
            for (name, asked, cpu, memory) in containers {
                let Some(asked) = asked else { continue };
                if let Some(c) = &asked.cpu {
                    within(
                        &format!("resources.{name}.cpu.limit"),
                        &c.limit,
                        &self.max_cpu,
                    )?;
                    *cpu = pair(c);
                }
                if let Some(m) = &asked.memory {
                    within(
                        &format!("resources.{name}.memory.limit"),
                        &m.limit,
                        &self.max_memory,
                    )?;
                    *memory = pair(m);
                }
            }
            if let Some(size) = &r.store_size {
                within("resources.storeSize", size, &self.max_store_size)?;
                s.store_size = size.clone();
            }
        }
        Ok(s)
    }
}

fn allowed(default: &str, others: &[String]) -> String {
    std::iter::once(default)
        .chain(others.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity("100m"), Some(0.1));
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("1.5"), Some(1.5));
        assert_eq!(quantity("512Mi"), Some(512.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("2G"), Some(2e9));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("lots"), None);
        assert_eq!(quantity("1Xi"), None);
        assert_eq!(quantity("-1"), None);
        assert!(quantity("4Gi") > quantity("4G"));
    }
}
